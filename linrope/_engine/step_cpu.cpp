// The decoding step of eq. 19 for one position on the CPU, compiled (kernel="cpp"; built on first use by
// linrope/_engine/compiled.py). The arithmetic of step._one, which is its reference: the same features, the same
// log-scale weights e (the state's) and w (the key's), the same rotation and sums, but the rotation, the state
// update, the row's product with the state and the normalizer are one pass per (batch, head) over the state,
// where the eager step makes some thirty tensor operations and reads the state twice.
//
// Per (batch, head), with qr = R fq, kr = R k0, pq = R_phase fq (fq without a phase):
//     num = e qr S0 + (pq . k0) v      (distance 0 unrotated)      S = e S0 + kr^T v
//     z   = e z0 + k0                  den = fq . z                 out = num / den (0 where den == 0)
// A non-finite value (or, with given features, a non-finite key feature) makes e NaN: the row and the state of
// that (batch, head) become NaN, as in the engine.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <limits>
#include <vector>

namespace {

constexpr double NEG = -1e30;  // feature_sources.NEG: a padded key's log-scale

template <typename T>
inline void turn(const T* x, const T* f, T* out, int64_t r, bool interleaved) {
  // x's pairs times the unit complex numbers f (r/2 of them, (cos, sin) interleaved)
  const int64_t h = r / 2;
  if (interleaved) {
    for (int64_t i = 0; i < h; ++i) {
      const T a = x[2 * i], b = x[2 * i + 1], c = f[2 * i], s = f[2 * i + 1];
      out[2 * i] = a * c - b * s;
      out[2 * i + 1] = a * s + b * c;
    }
  } else {
    for (int64_t i = 0; i < h; ++i) {
      const T a = x[i], b = x[i + h], c = f[2 * i], s = f[2 * i + 1];
      out[i] = a * c - b * s;
      out[i + h] = a * s + b * c;
    }
  }
}

template <typename T>
inline bool finite_all(const T* x, int64_t n) {
  T acc = 0;  // x * 0 is 0 unless x is not finite
  for (int64_t i = 0; i < n; ++i) acc += x[i] * T(0);
  return acc == T(0);
}

template <typename T>
void step_rows(const T* fq_all, const T* kb_all, const T* v_all, const T* S0_all, const T* z0_all, const double* M0,
               const double* s_all, const bool* keep, const T* qf, int64_t qf_b, int64_t qf_h, const T* kf,
               int64_t kf_b, int64_t kf_h, const T* pf, bool interleaved, bool check_keys, int64_t BH, int64_t H,
               int64_t r, int64_t dv, T* out_all, T* S_all, T* z_all, double* M_out) {
  at::parallel_for(0, BH, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> buf(4 * r + dv);
    T *k0 = buf.data(), *qr = k0 + r, *kr = qr + r, *pq = kr + r, *num = pq + r;
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H, h = bh % H;
      const T *fq = fq_all + bh * r, *kb = kb_all + bh * r, *v = v_all + bh * dv;
      const T *S0 = S0_all + bh * r * dv, *z0 = z0_all + bh * r;
      T *S = S_all + bh * r * dv, *z = z_all + bh * r, *out = out_all + bh * dv;
      const bool kept = keep == nullptr || keep[b];
      // the key's and the state's weights: m = max(M0, s), e = exp(M0 - m), w = exp(s - m) (NaN propagates)
      T e = 1, w = 1;
      double m = M0[bh];
      if (s_all != nullptr) {
        const double s = kept ? s_all[bh] : NEG;
        const double m0 = M0[bh];
        m = (std::isnan(s) || std::isnan(m0)) ? std::numeric_limits<double>::quiet_NaN() : std::max(m0, s);
        e = static_cast<T>(std::exp(m0 - m));
        w = static_cast<T>(std::exp(s - m));
      }
      M_out[bh] = m;
      for (int64_t i = 0; i < r; ++i) k0[i] = kept ? kb[i] * w : T(0);
      const T *qrp = fq, *krp = k0, *pqp = fq;
      if (qf != nullptr) {
        turn(fq, qf + (qf_b > 1 ? b : 0) * qf_h * r + (qf_h > 1 ? h : 0) * r, qr, r, interleaved);
        turn(k0, kf + (kf_b > 1 ? b : 0) * kf_h * r + (kf_h > 1 ? h : 0) * r, kr, r, interleaved);
        qrp = qr;
        krp = kr;
      }
      if (pf != nullptr) {
        turn(fq, pf + h * r, pq, r, true);
        pqp = pq;
      }
      if (!finite_all(v, dv) || (check_keys && !finite_all(krp, r))) e = std::numeric_limits<T>::quiet_NaN();
      T d0 = 0;  // distance 0: the row's own key, unrotated
      for (int64_t i = 0; i < r; ++i) d0 += pqp[i] * k0[i];
      for (int64_t j = 0; j < dv; ++j) num[j] = 0;
      for (int64_t i = 0; i < r; ++i) {  // one pass over the state: the row's product and the update
        const T a = qrp[i] * e, c = krp[i];
        const T* s0 = S0 + i * dv;
        T* s1 = S + i * dv;
        for (int64_t j = 0; j < dv; ++j) {
          num[j] += a * s0[j];
          s1[j] = s0[j] * e + c * v[j];
        }
      }
      T den = 0;
      for (int64_t i = 0; i < r; ++i) {
        z[i] = k0[i] + z0[i] * e;
        den += fq[i] * z[i];
      }
      for (int64_t j = 0; j < dv; ++j) out[j] = den == T(0) ? T(0) : (num[j] + d0 * v[j]) / den;
    }
  });
}

const at::Tensor* opt(const c10::optional<at::Tensor>& t) { return t.has_value() && t->defined() ? &*t : nullptr; }

}  // namespace

// Arguments (contiguous, one dtype T = float32 or float64 but where named): q, k: with a ``projection`` W (r, d),
// the raw query and key (BH, d), whose FAVOR+ features are made here as step._one makes them (x~ = x d^(-1/4),
// u = x~ W^T, exp(u - max u), the key's log-scale max u - |x~|^2 / 2, plus ``k_logscale`` (BH,) float64 if given:
// a gate's -G); without one, the features (BH, r) and the key's log-scale ``k_logscale`` (BH,) float64 or None
// (keys without magnitudes). v (BH, dv); S0 (BH, r, dv);
// z0 (BH, r); M0 (BH,) float64; key_bias (BH,) float64 (a decay) or None; keep (B,) bool or None; qf, kf
// (Bf, Hf, r/2, 2): the query's and the key's rotation factors (cos, sin), or None; pf (H, r/2, 2): a learned
// phase's, or None. Returns out (BH, dv), S (BH, r, dv), z (BH, r), M (BH,) float64.
std::vector<at::Tensor> step_one(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& S0,
                                 const at::Tensor& z0, const at::Tensor& M0,
                                 const c10::optional<at::Tensor>& projection,
                                 const c10::optional<at::Tensor>& k_logscale,
                                 const c10::optional<at::Tensor>& key_bias, const c10::optional<at::Tensor>& keep,
                                 const c10::optional<at::Tensor>& qf, const c10::optional<at::Tensor>& kf,
                                 const c10::optional<at::Tensor>& pf, bool interleaved, int64_t H) {
  const int64_t BH = S0.size(0), r = S0.size(1), dv = S0.size(2);
  const auto dtype = S0.scalar_type();
  TORCH_CHECK(H > 0 && BH % H == 0, "step_one: B*H not a multiple of H");
  const at::Tensor *W = opt(projection), *ls = opt(k_logscale), *bias = opt(key_bias), *kp = opt(keep);
  const at::Tensor *qp = opt(qf), *kfp = opt(kf), *pp = opt(pf);
  TORCH_CHECK(r % 2 == 0 || (qp == nullptr && pp == nullptr), "step_one: rotations need an even r");
  TORCH_CHECK((qp == nullptr) == (kfp == nullptr), "step_one: qf and kf together");
  for (const at::Tensor* t : {&q, &k, &v, &S0, &z0, W, qp, kfp, pp}) {
    TORCH_CHECK(t == nullptr || (t->is_contiguous() && t->scalar_type() == dtype && t->device().is_cpu()),
                "step_one: expected contiguous CPU tensors of the state's dtype");
  }
  for (const at::Tensor* t : {&M0, ls, bias}) {
    TORCH_CHECK(t == nullptr || (t->scalar_type() == at::kDouble && t->is_contiguous() && t->numel() == BH),
                "step_one: log-scales (BH,) float64");
  }
  TORCH_CHECK(kp == nullptr || (kp->scalar_type() == at::kBool && kp->is_contiguous() && BH % kp->numel() == 0),
              "step_one: keep (B,) bool");
  at::Tensor fq = q, kb = k, s;
  if (W != nullptr) {  // FAVOR+: one product for the query and the key, exp(u - max u) in place
    auto x = at::stack({q, k}).mul_(std::pow(static_cast<double>(q.size(-1)), -0.25));  // (2, BH, d)
    auto u = at::linear(x, *W);                                                        // (2, BH, r)
    auto top = u.amax(-1, true);
    u.sub_(top).exp_();
    fq = u.select(0, 0);
    kb = u.select(0, 1);
    s = at::sub(top.select(0, 1), x.select(0, 1).square().sum(-1, true), 0.5).view({BH}).to(at::kDouble);
    if (ls != nullptr) s = s + *ls;  // a log-bias of the key (a gate's -G)
  } else if (ls != nullptr) {
    s = *ls;
  }
  if (bias != nullptr) s = s.defined() ? s + *bias : *bias;
  auto S = at::empty_like(S0);
  auto z = at::empty_like(z0);
  auto out = at::empty({BH, dv}, S0.options());
  auto M = at::empty({BH}, M0.options());
  AT_DISPATCH_FLOATING_TYPES(dtype, "step_one", [&] {
    using T = scalar_t;
    auto ptr = [](const at::Tensor* t) -> const T* { return t == nullptr ? nullptr : t->data_ptr<T>(); };
    step_rows<T>(fq.data_ptr<T>(), kb.data_ptr<T>(), v.data_ptr<T>(), S0.data_ptr<T>(), z0.data_ptr<T>(),
                 M0.data_ptr<double>(), s.defined() ? s.data_ptr<double>() : nullptr,
                 kp == nullptr ? nullptr : kp->data_ptr<bool>(), ptr(qp), qp ? qp->size(0) : 1, qp ? qp->size(1) : 1,
                 ptr(kfp), kfp ? kfp->size(0) : 1, kfp ? kfp->size(1) : 1, ptr(pp), interleaved, W == nullptr, BH, H,
                 r, dv, out.data_ptr<T>(), S.data_ptr<T>(), z.data_ptr<T>(), M.data_ptr<double>());
  });
  return {out, S, z, M};
}

void bind_causal(pybind11::module& m);  // causal_cpu.cpp: the full causal pass, built into the same module

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("step_one", &step_one, "eq. 19's decoding step for one position (see step_cpu.cpp)");
  bind_causal(m);
}
