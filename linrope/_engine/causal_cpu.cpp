// Causal eq. 19 with FAVOR+ features over whole sequences on the CPU, compiled (kernel="cpp"; built on first use by
// linrope/_engine/compiled.py together with step_cpu.cpp). The sums of chunked.causal_forward / causal_backward,
// which are its reference (the tests hold the two to float32 rounding of each other and both to float64), computed
// per (batch, head) in one loop over its chunks, the (batch, head) rows shared out between threads:
//
//   * FAVOR+ features of a chunk by one product each (u = x Ws^T), exponentiated, rotated and dropped while they are
//     in the core's cache; never written to memory as a whole;
//   * the causal products of a chunk (Qr Kr^T, A V, Qr S, Kr^T V) and their gradients as BLAS calls on the chunk's
//     tiles (sgemm, one thread per call: the threads already split the rows);
//   * the unrotated normalizer as a running key sum, den_t = fq_t . (z + sum_{n<=t} k0_n): r additions and a dot
//     product per position where the torch engine needs sub-chunk products; the distance-0 score fq_t . k0_t (the
//     rotations cancel there, see chunked.py) is that sum's own term.
//
// Key log-scales and references as in chunked.py: a chunk's keys are exp(u - |k~|^2/2 - P) with P the running max
// M of earlier keys' log-scales or the chunk's first key if larger; a key above P by more than JUMP_LIMIT starts a
// new sub-chunk (no host round trip is needed here: the loop reads the values). The state is kept relative to M.
// A non-finite key or value (of a kept key) makes its row and every later row of that (batch, head) NaN, the state
// after it NaN, and, in the backward, every gradient of that (batch, head) NaN.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

extern "C" void sgemm_(const char* ta, const char* tb, const int* m, const int* n, const int* k, const float* alpha,
                       const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
                       const int* ldc);

namespace {

constexpr double NEG = -1e30;         // feature_sources.NEG
constexpr double JUMP_LIMIT = 40.0;   // chunked.JUMP_LIMIT
const float NaN = std::numeric_limits<float>::quiet_NaN();

// Row-major C (m x n) = alpha op(A) op(B) + beta C, op(X) = X^T when t*, lda/ldb/ldc the row strides as stored:
// the column-major BLAS computes C^T = op(B)^T op(A)^T.
inline void gemm(bool ta, bool tb, int m, int n, int k, float alpha, const float* A, int lda, const float* B, int ldb,
                 float beta, float* C, int ldc) {
  if (m == 0 || n == 0) return;
  if (k == 0) {  // BLAS would scale C by beta; keep that meaning
    for (int i = 0; i < m; ++i)
      for (int j = 0; j < n; ++j) C[i * ldc + j] = beta == 0.f ? 0.f : beta * C[i * ldc + j];
    return;
  }
  const char a = ta ? 'T' : 'N', b = tb ? 'T' : 'N';
  sgemm_(&b, &a, &n, &m, &k, &alpha, B, &ldb, A, &lda, &beta, C, &ldc);
}

// Loops the compiler vectorizes: reductions through `omp simd` (no global fast-math, so NaN and inf keep their
// meaning), exp through exp_row.
inline float dot(const float* x, const float* y, int n) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int i = 0; i < n; ++i) s += x[i] * y[i];
  return s;
}

inline float row_max(const float* x, int n) {
  float m = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : m)
  for (int i = 0; i < n; ++i) m = x[i] > m ? x[i] : m;
  return m;
}

// y_i = exp(x_i - c): 2^j p(f) with x - c = j ln 2 + f, |f| <= ln(2)/2, p the degree-6 Taylor polynomial (relative
// error ~2e-7, a float32 rounding or two: within what the tests allow the engine against float64); 0 below the
// float32 normal range (exp < 1e-38, nothing against the reference key of each row), NaN stays NaN.
inline void exp_row(const float* x, float c, float* y, int n) {
#pragma omp simd
  for (int i = 0; i < n; ++i) {
    const float t = x[i] - c;
    const float tc = std::min(std::max(t, -87.f), 88.f);
    const float j = std::nearbyint(tc * 1.44269504f);
    const float f = (tc - j * 0.693145752f) - j * 1.42860677e-6f;
    float p = 1.f / 720.f;
    p = p * f + 1.f / 120.f;
    p = p * f + 1.f / 24.f;
    p = p * f + 1.f / 6.f;
    p = p * f + 0.5f;
    p = p * f + 1.f;
    p = p * f + 1.f;
    const int32_t bits = ((int32_t)j + 127) << 23;
    float two_j;
    std::memcpy(&two_j, &bits, 4);
    const float e = p * two_j;
    y[i] = t < -87.f ? 0.f : (t != t ? t : e);
  }
}

inline void axpy(float a, const float* x, float* y, int n) {
  for (int i = 0; i < n; ++i) y[i] += a * x[i];
}

inline void scale(float a, float* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) x[i] *= a;
}

// A state (S (r, dv), z (r)) moved to another reference: both times e.
inline void scale_state(float e, float* S, float* z, int64_t r, int64_t dv) {
  scale(e, S, r * dv);
  scale(e, z, r);
}

inline bool finite_row(const float* x, int n) {
  float acc = 0.f;  // x * 0 is 0 unless x is not finite
#pragma omp simd reduction(+ : acc)
  for (int i = 0; i < n; ++i) acc += x[i] * 0.f;
  return acc == 0.f;
}

// y = R x for one row of r features, interleaved pairs, factors (cos, sin) of r/2; R^T with inverse. Each caller
// turns a row right after making it, while it is in L1 (a whole chunk's tile is not).
inline void rotate_row(const float* x, float* y, int r, const float* c, const float* s, bool inverse) {
  const int h = r / 2;
  const float sign = inverse ? -1.f : 1.f;
#pragma omp simd
  for (int i = 0; i < h; ++i) {
    const float a = x[2 * i], b = x[2 * i + 1], si = sign * s[i];
    y[2 * i] = a * c[i] - b * si;
    y[2 * i + 1] = a * si + b * c[i];
  }
}

struct Shape {
  int64_t BH, H, N, d, r, dv, C, G;  // G: positions per saved state (a multiple of C)
  int64_t cos_b;                      // 0: one rotation table for every row; else rows of example bh / H
  bool rope;
};

// Rows of a (B, H, N, D) float32 tensor whose last dim is contiguous (any other strides: the layer's q, k, v are
// views of one projection, grouped kv heads broadcast): no copy of the inputs is made.
struct Rows {
  const float* p;
  int64_t sb, sh, sn, H;
  Rows(const at::Tensor& t) : p(t.data_ptr<float>()), sb(t.stride(0)), sh(t.stride(1)), sn(t.stride(2)), H(t.size(1)) {}
  const float* at(int64_t bh, int64_t n) const { return p + (bh / H) * sb + (bh % H) * sh + n * sn; }
  int ld() const { return (int)sn; }
};

struct Ptrs {
  Rows q, k, v;
  const float *Ws, *cos, *sin;
  const double* hs;   // (BH, N) |k~|^2/2 less the keys' log-biases
  const bool* keep;   // (BH, N) key padding, or null
};

// One sub-chunk: rows [s, e) of the chunk buffers (row offset o = s - chunk start), at reference P.
struct Sub {
  int64_t s, e;
  double P, M_before, M_after;
};

// Per-thread scratch of one chunk (C rows) and, in the backward, of one group's keys.
struct Scratch {
  std::vector<float> uq, fq, qr, uk, k0, kr, A, num, zr, tmp;
  std::vector<double> ls;
  Scratch(const Shape& sh, int64_t key_rows) {
    const int64_t C = sh.C, r = sh.r;
    uq.resize(C * r); fq.resize(C * r); qr.resize(sh.rope ? C * r : 0);
    uk.resize(key_rows * r); k0.resize(key_rows * r); kr.resize(sh.rope ? key_rows * r : 0);
    A.resize(C * C); num.resize(C * std::max(sh.dv, r)); zr.resize(r); tmp.resize(C * std::max(sh.dv, r));
    ls.resize(key_rows);
  }
};

inline const float* cos_rows(const Shape& sh, const Ptrs& p, int64_t bh, int64_t pos) {
  const int64_t b = sh.cos_b ? bh / sh.H : 0;
  return p.cos + (b * sh.N + pos) * (sh.r / 2);
}
inline const float* sin_rows(const Shape& sh, const Ptrs& p, int64_t bh, int64_t pos) {
  const int64_t b = sh.cos_b ? bh / sh.H : 0;
  return p.sin + (b * sh.N + pos) * (sh.r / 2);
}

// Query features of positions [a, a + L) into fq (and qr = R fq): exp(u - max u) per row.
void query_features(const Shape& sh, const Ptrs& p, int64_t bh, int64_t a, int L, Scratch& w) {
  const int r = sh.r, d = sh.d;
  gemm(false, true, L, r, d, 1.f, p.q.at(bh, a), p.q.ld(), p.Ws, d, 0.f, w.uq.data(), r);
  const float *cs = sh.rope ? cos_rows(sh, p, bh, a) : nullptr, *sn = sh.rope ? sin_rows(sh, p, bh, a) : nullptr;
  for (int t = 0; t < L; ++t) {
    float* u = w.uq.data() + (int64_t)t * r;
    float* f = w.fq.data() + (int64_t)t * r;
    exp_row(u, row_max(u, r), f, r);
    if (sh.rope)
      rotate_row(f, w.qr.data() + (int64_t)t * r, r, cs + (int64_t)t * (r / 2), sn + (int64_t)t * (r / 2), false);
  }
}

// Raw key products u (rows [o, o + L) of w.uk) and log-scales of positions [a, a + L); NEG for padded keys.
void key_logscales(const Shape& sh, const Ptrs& p, int64_t bh, int64_t a, int L, int64_t o, Scratch& w) {
  const int r = sh.r, d = sh.d;
  float* u = w.uk.data() + o * r;
  gemm(false, true, L, r, d, 1.f, p.k.at(bh, a), p.k.ld(), p.Ws, d, 0.f, u, r);
  for (int t = 0; t < L; ++t) {
    const int64_t n = bh * sh.N + a + t;
    if (p.keep != nullptr && !p.keep[n]) {
      w.ls[o + t] = NEG;
      continue;
    }
    w.ls[o + t] = (double)row_max(u + (int64_t)t * r, r) - p.hs[n];
  }
}

// k0 = exp(u - hs - P) (0 for padded keys) of rows [o, o + L) (positions [a, a + L)), and kr = R k0.
void key_finish(const Shape& sh, const Ptrs& p, int64_t bh, int64_t a, int L, int64_t o, double P, Scratch& w) {
  const int r = sh.r;
  for (int t = 0; t < L; ++t) {
    const int64_t n = bh * sh.N + a + t;
    const float* u = w.uk.data() + (o + t) * r;
    float* k = w.k0.data() + (o + t) * r;
    if (p.keep != nullptr && !p.keep[n]) {
      std::fill(k, k + r, 0.f);
      if (sh.rope) std::fill(w.kr.data() + (o + t) * r, w.kr.data() + (o + t + 1) * r, 0.f);
      continue;
    }
    const float c = (float)(p.hs[n] + P);  // moderate: exact enough in float32 (as key_finish in feature_sources)
    exp_row(u, c, k, r);
    if (sh.rope)
      rotate_row(k, w.kr.data() + (o + t) * r, r, cos_rows(sh, p, bh, a + t), sin_rows(sh, p, bh, a + t), false);
  }
}

// The sub-chunk starting at row o of the key buffers (rows [o, end) left, row 0 at position pos0): its reference P,
// max(M, its first key), else its first kept key, else 0; it ends before the first later key above P by more than
// JUMP_LIMIT; and the running max after it.
Sub plan_sub(const std::vector<double>& ls, int64_t o, int64_t end, double M, int64_t pos0) {
  double P = std::max(M, ls[o]);
  if (!(P > NEG / 2)) {
    P = 0.0;
    for (int64_t t = o; t < end; ++t)
      if (ls[t] > NEG / 2) { P = ls[t]; break; }
  }
  int64_t e = end;
  for (int64_t t = o + 1; t < end; ++t)
    if (ls[t] - P > JUMP_LIMIT) { e = t; break; }
  double mx = M;
  for (int64_t t = o; t < e; ++t) {
    if (std::isnan(ls[t])) mx = ls[t];
    else if (!std::isnan(mx)) mx = std::max(mx, ls[t]);
  }
  return Sub{pos0 + o, pos0 + e, P, M, mx};
}

inline float rescale_out(const Sub& sb) {
  return sb.M_after > NEG / 2 ? (float)std::exp(sb.P - sb.M_after) : 1.f;
}

// The first position of row bh whose kept key or value is not finite (N if none).
int64_t first_bad(const Shape& sh, const Ptrs& p, int64_t bh) {
  for (int64_t n = 0; n < sh.N; ++n) {
    const int64_t i = bh * sh.N + n;
    if (p.keep != nullptr && !p.keep[i]) continue;
    if (!std::isfinite(p.hs[i]) || !finite_row(p.k.at(bh, n), sh.d) || !finite_row(p.v.at(bh, n), sh.dv)) return n;
  }
  return sh.N;
}

// Scores of a sub-chunk of L rows: A = tril(Qr Kr^T) with the diagonal fq_t . k0_t (the rotations cancel there).
// qrows/krows: the sub-chunk's rows in the query and key buffers.
void scores(const Shape& sh, int L, const float* fq, const float* Q, const float* k0, const float* K, float* A) {
  const int r = sh.r;
  gemm(false, true, L, L, r, 1.f, Q, r, K, r, 0.f, A, L);
  for (int t = 0; t < L; ++t) {
    float* row = A + (int64_t)t * L;
    for (int n = t + 1; n < L; ++n) row[n] = 0.f;
    if (sh.rope) row[t] = dot(fq + (int64_t)t * r, k0 + (int64_t)t * r, r);
  }
}

// The sizes and inputs of a call (both passes take the same arguments first).
Shape shape_of(const at::Tensor& q, const at::Tensor& v, const at::Tensor& Ws, const c10::optional<at::Tensor>& cos,
               int64_t C, int64_t G) {
  const int64_t H = q.size(1);
  Shape sh{q.size(0) * H, H, q.size(2), q.size(3), Ws.size(0), v.size(3), C, G, 0, cos.has_value()};
  if (sh.rope) sh.cos_b = cos->size(0) > 1;
  return sh;
}

Ptrs pointers(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& Ws,
              const at::Tensor& hs, const c10::optional<at::Tensor>& keep, const c10::optional<at::Tensor>& cos,
              const c10::optional<at::Tensor>& sin) {
  return Ptrs{Rows(q), Rows(k), Rows(v), Ws.data_ptr<float>(), cos ? cos->data_ptr<float>() : nullptr,
              sin ? sin->data_ptr<float>() : nullptr, hs.data_ptr<double>(),
              keep ? keep->data_ptr<bool>() : nullptr};
}

std::vector<at::Tensor> causal_forward(at::Tensor q, at::Tensor k, at::Tensor v, at::Tensor Ws, at::Tensor hs,
                                       c10::optional<at::Tensor> keep, c10::optional<at::Tensor> cos,
                                       c10::optional<at::Tensor> sin, at::Tensor S0, at::Tensor z0, at::Tensor M0,
                                       int64_t C, int64_t G, bool save) {
  // q, k (B, H, N, d), v (B, H, N, dv) float32 with contiguous rows, Ws (r, d), hs (BH, N) float64, keep (BH, N)
  // bool, cos/sin (Bc, N, r/2);
  // S0 (BH, r, dv), z0 (BH, r), M0 (BH,) float64. Returns out, den, S, z, M, the states every G positions
  // (save: (BH, ceil(N / G), r, dv), (.., r), (.., ) float64) and the first non-finite position per row.
  const Shape sh = shape_of(q, v, Ws, cos, C, G);
  const Ptrs p = pointers(q, k, v, Ws, hs, keep, cos, sin);
  const int64_t BH = sh.BH, N = sh.N, r = sh.r, dv = sh.dv, ng = save ? (N + G - 1) / G : 0;
  auto f32 = q.options();
  auto out = at::empty({BH, N, dv}, f32), den = at::empty({BH, N}, f32);
  auto S = S0.clone(), z = z0.clone(), M = M0.clone();
  auto Ss = at::empty({BH, ng, r, dv}, f32), zs = at::empty({BH, ng, r}, f32), Ms = at::empty({BH, ng}, M0.options());
  auto bad = at::empty({BH}, q.options().dtype(at::kLong));
  at::parallel_for(0, BH, 1, [&](int64_t begin, int64_t end) {
    Scratch w(sh, C);
    for (int64_t bh = begin; bh < end; ++bh) {
      float *Sb = S.data_ptr<float>() + bh * r * dv, *zb = z.data_ptr<float>() + bh * r;
      double Mb = M.data_ptr<double>()[bh];
      float *ob = out.data_ptr<float>() + bh * N * dv, *db = den.data_ptr<float>() + bh * N;
      const float* vb = p.v.at(bh, 0);
      const int vs = p.v.ld();
      const int64_t stop = first_bad(sh, p, bh);
      bad.data_ptr<int64_t>()[bh] = stop;
      for (int64_t a = 0; a < stop; a += C) {
        if (save && a % G == 0) {
          const int64_t g = a / G;
          std::copy(Sb, Sb + r * dv, Ss.data_ptr<float>() + (bh * ng + g) * r * dv);
          std::copy(zb, zb + r, zs.data_ptr<float>() + (bh * ng + g) * r);
          Ms.data_ptr<double>()[bh * ng + g] = Mb;
        }
        const int L = (int)std::min(C, stop - a);
        query_features(sh, p, bh, a, L, w);
        key_logscales(sh, p, bh, a, L, 0, w);
        for (int64_t o = 0; o < L;) {
          Sub sb = plan_sub(w.ls, o, L, Mb, a);
          const int l = (int)(sb.e - sb.s);
          key_finish(sh, p, bh, sb.s, l, o, sb.P, w);
          const float ein = (float)std::exp(Mb - sb.P);
          scale_state(ein, Sb, zb, r, dv);
          const float *fq = w.fq.data() + o * r, *k0 = w.k0.data() + o * r;
          const float *Q = sh.rope ? w.qr.data() + o * r : fq, *K = sh.rope ? w.kr.data() + o * r : k0;
          scores(sh, l, fq, Q, k0, K, w.A.data());
          float* num = w.num.data();
          gemm(false, false, l, dv, l, 1.f, w.A.data(), l, vb + sb.s * vs, vs, 0.f, num, dv);
          gemm(false, false, l, dv, r, 1.f, Q, r, Sb, dv, 1.f, num, dv);
          for (int t = 0; t < l; ++t) {  // den_t = fq_t . (z + keys up to t); z ends as the sum after the chunk
            axpy(1.f, k0 + (int64_t)t * r, zb, r);
            const float dn = dot(fq + (int64_t)t * r, zb, r);
            db[sb.s + t] = dn;
            float* orow = ob + (sb.s + t) * dv;
            const float* nrow = num + (int64_t)t * dv;
            if (dn == 0.f) std::fill(orow, orow + dv, 0.f);
            else for (int j = 0; j < dv; ++j) orow[j] = nrow[j] / dn;
          }
          gemm(true, false, r, dv, l, 1.f, K, r, vb + sb.s * vs, vs, 1.f, Sb, dv);
          Mb = sb.M_after;
          const float eo = rescale_out(sb);
          scale_state(eo, Sb, zb, r, dv);
          o += l;
        }
      }
      if (stop < N) {  // rows from the first non-finite key or value on see it
        std::fill(ob + stop * dv, ob + N * dv, NaN);
        std::fill(db + stop, db + N, NaN);
        std::fill(Sb, Sb + r * dv, NaN), std::fill(zb, zb + r, NaN);
        if (save)
          for (int64_t g = (stop + G - 1) / G; g < ng; ++g) {  // groups the loop never reached (never replayed)
            float* Sg = Ss.data_ptr<float>() + (bh * ng + g) * r * dv;
            std::fill(Sg, Sg + r * dv, NaN);
            std::fill(zs.data_ptr<float>() + (bh * ng + g) * r, zs.data_ptr<float>() + (bh * ng + g + 1) * r, NaN);
            Ms.data_ptr<double>()[bh * ng + g] = NEG;
          }
      }
      M.data_ptr<double>()[bh] = Mb;
    }
  });
  return {out, den, S, z, M, Ss, zs, Ms, bad};
}

// Row t's gradient w.r.t. unrotated features from g, its gradient w.r.t. the rotated ones: R^T g, plus the distance-0
// product's share dd * (the other side's feature), which bypasses the rotation; g itself without RoPE.
inline void unrotated_grad(const Shape& sh, const float* g, float* row, float dd, const float* other, const float* cs,
                           const float* sn, int t) {
  const int r = (int)sh.r;
  if (!sh.rope) {
    std::copy(g, g + r, row);
    return;
  }
  rotate_row(g, row, r, cs + (int64_t)t * (r / 2), sn + (int64_t)t * (r / 2), true);
  axpy(dd, other, row, r);
}

std::vector<at::Tensor> causal_backward(at::Tensor q, at::Tensor k, at::Tensor v, at::Tensor Ws, at::Tensor hs,
                                        c10::optional<at::Tensor> keep, c10::optional<at::Tensor> cos,
                                        c10::optional<at::Tensor> sin, at::Tensor out, at::Tensor den,
                                        at::Tensor dout, at::Tensor dS_end, at::Tensor dz_end, at::Tensor Ss,
                                        at::Tensor zs, at::Tensor Ms, at::Tensor bad, int64_t C,
                                        int64_t G, double scale2) {
  // Gradients of causal_forward given d out (B, H, N, dv) (contiguous rows) and those of the final S, z. Each group
  // of G positions is replayed from its saved state (keys, references, the state entering each sub-chunk), then its
  // sub-chunks run backwards. Returns dq, dk (BH, N, d), dv (BH, N, dv), dks (BH, N) (the keys' log-bias), dS0,
  // dz0.
  const Shape sh = shape_of(q, v, Ws, cos, C, G);
  const Ptrs p = pointers(q, k, v, Ws, hs, keep, cos, sin);
  const int64_t BH = sh.BH, N = sh.N, r = sh.r, dv = sh.dv, d = sh.d, ng = (N + G - 1) / G;
  auto f32 = q.options();
  auto dq = at::empty({BH, N, d}, f32), dk = at::empty({BH, N, d}, f32), dvv = at::empty({BH, N, dv}, f32);
  auto dks = at::empty({BH, N}, f32);
  auto dS = dS_end.clone(), dz = dz_end.clone();
  at::parallel_for(0, BH, 1, [&](int64_t begin, int64_t end) {
    Scratch w(sh, G);
    std::vector<float> Sin, zin, dQ(C * r), dK(C * r), dA(C * C), g(C * dv), dden(C), wsum(r), ddiag(C);
    std::vector<Sub> subs;
    for (int64_t bh = begin; bh < end; ++bh) {
      float *dSb = dS.data_ptr<float>() + bh * r * dv, *dzb = dz.data_ptr<float>() + bh * r;
      const float* vb = p.v.at(bh, 0);
      const int vs = p.v.ld();
      const float *ob = out.data_ptr<float>() + bh * N * dv, *db = den.data_ptr<float>() + bh * N;
      const Rows go(dout);
      const float* gob = go.at(bh, 0);
      float *dqb = dq.data_ptr<float>() + bh * N * d, *dkb = dk.data_ptr<float>() + bh * N * d;
      float *dvb = dvv.data_ptr<float>() + bh * N * dv, *dksb = dks.data_ptr<float>() + bh * N;
      if (bad.data_ptr<int64_t>()[bh] < N) {  // a non-finite key or value: every gradient of the row is NaN
        std::fill(dqb, dqb + N * d, NaN), std::fill(dkb, dkb + N * d, NaN), std::fill(dvb, dvb + N * dv, NaN);
        std::fill(dksb, dksb + N, NaN), std::fill(dSb, dSb + r * dv, NaN), std::fill(dzb, dzb + r, NaN);
        continue;
      }
      for (int64_t gi = ng - 1; gi >= 0; --gi) {
        const int64_t ga = gi * G, gb = std::min(N, ga + G);
        // replay: the group's keys at their references and the state entering each sub-chunk
        std::vector<float> S(Ss.data_ptr<float>() + (bh * ng + gi) * r * dv,
                             Ss.data_ptr<float>() + (bh * ng + gi + 1) * r * dv);
        std::vector<float> z(zs.data_ptr<float>() + (bh * ng + gi) * r, zs.data_ptr<float>() + (bh * ng + gi + 1) * r);
        double Mb = Ms.data_ptr<double>()[bh * ng + gi];
        subs.clear(), Sin.clear(), zin.clear();
        for (int64_t a = ga; a < gb; a += C) {
          const int L = (int)std::min(C, gb - a);
          key_logscales(sh, p, bh, a, L, a - ga, w);
          for (int64_t o = a - ga; o < a - ga + L;) {
            Sub sb = plan_sub(w.ls, o, a - ga + L, Mb, ga);
            const int l = (int)(sb.e - sb.s);
            key_finish(sh, p, bh, sb.s, l, o, sb.P, w);
            const float ein = (float)std::exp(Mb - sb.P);
            scale_state(ein, S.data(), z.data(), r, dv);
            Sin.insert(Sin.end(), S.begin(), S.end()), zin.insert(zin.end(), z.begin(), z.end());
            const float *k0 = w.k0.data() + o * r, *K = sh.rope ? w.kr.data() + o * r : k0;
            gemm(true, false, r, dv, l, 1.f, K, r, vb + sb.s * vs, vs, 1.f, S.data(), dv);
            for (int t = 0; t < l; ++t) axpy(1.f, k0 + (int64_t)t * r, z.data(), r);
            Mb = sb.M_after;
            const float eo = rescale_out(sb);
            scale_state(eo, S.data(), z.data(), r, dv);
            subs.push_back(sb);
            o += l;
          }
        }
        for (int64_t si = (int64_t)subs.size() - 1; si >= 0; --si) {
          const Sub& sb = subs[si];
          const int l = (int)(sb.e - sb.s);
          const int64_t o = sb.s - ga;
          const float* S_in = Sin.data() + si * r * dv;
          const float* z_in = zin.data() + si * r;
          const float eo = rescale_out(sb);
          scale_state(eo, dSb, dzb, r, dv);
          query_features(sh, p, bh, sb.s, l, w);
          const float *fq = w.fq.data(), *Q = sh.rope ? w.qr.data() : fq;
          const float *k0 = w.k0.data() + o * r, *K = sh.rope ? w.kr.data() + o * r : k0;
          scores(sh, l, fq, Q, k0, K, w.A.data());
          for (int t = 0; t < l; ++t) {  // g = d out / den, d den = -(g . out): 0 on rows without keys
            const float dn = db[sb.s + t];
            const float *orow = ob + (sb.s + t) * dv, *grow = gob + (sb.s + t) * go.sn;
            float* gt = g.data() + (int64_t)t * dv;
            float acc = 0.f;
            if (dn == 0.f) std::fill(gt, gt + dv, 0.f);
            else for (int j = 0; j < dv; ++j) { gt[j] = grow[j] / dn; acc += gt[j] * orow[j]; }
            dden[t] = -acc;
          }
          const float* Vc = vb + sb.s * vs;
          gemm(false, true, l, l, dv, 1.f, g.data(), dv, Vc, vs, 0.f, dA.data(), l);  // dA = G V^T, tril
          for (int t = 0; t < l; ++t) {
            float* row = dA.data() + (int64_t)t * l;
            for (int n = t + 1; n < l; ++n) row[n] = 0.f;
            if (sh.rope) ddiag[t] = row[t], row[t] = 0.f;
          }
          gemm(false, false, l, r, l, 1.f, dA.data(), l, K, r, 0.f, dQ.data(), r);
          gemm(false, true, l, r, dv, 1.f, g.data(), dv, S_in, dv, 1.f, dQ.data(), r);
          gemm(true, false, l, r, l, 1.f, dA.data(), l, Q, r, 0.f, dK.data(), r);
          gemm(false, true, l, r, dv, 1.f, Vc, vs, dSb, dv, 1.f, dK.data(), r);
          float* dVc = dvb + sb.s * dv;
          gemm(true, false, l, dv, l, 1.f, w.A.data(), l, g.data(), dv, 0.f, dVc, dv);
          gemm(false, false, l, dv, r, 1.f, K, r, dSb, dv, 1.f, dVc, dv);
          gemm(true, false, r, dv, l, 1.f, Q, r, g.data(), dv, 1.f, dSb, dv);  // dS entering = dS + Qr^T G
          // per row, while it is in L1: un-rotate the products' gradients, add the distance-0 term's and the
          // normalizer's (den_t = fq_t . (z_in + sum_{n<=t} k0_n)), and go through the features' exponentials
          // (fq = exp(u - max u), whose row factor cancels; k0 = exp(u - hs - P))
          float* dfq = w.num.data();
          float* dk0 = w.tmp.data();
          const float *cs = sh.rope ? cos_rows(sh, p, bh, sb.s) : nullptr;
          const float *sn = sh.rope ? sin_rows(sh, p, bh, sb.s) : nullptr;
          std::copy(z_in, z_in + r, w.zr.data());
          for (int t = 0; t < l; ++t) {
            float* row = dfq + (int64_t)t * r;
            const float *ft = fq + (int64_t)t * r, *kt = k0 + (int64_t)t * r;
            unrotated_grad(sh, dQ.data() + (int64_t)t * r, row, ddiag[t], kt, cs, sn, t);
            axpy(1.f, kt, w.zr.data(), r);
            const float dd = dden[t];
            const float* zr = w.zr.data();
#pragma omp simd
            for (int i = 0; i < r; ++i) row[i] = (row[i] + dd * zr[i]) * ft[i];
          }
          std::copy(dzb, dzb + r, wsum.data());  // d (key sum after row n) = dz + sum_{t>=n} dden_t fq_t
          for (int t = l - 1; t >= 0; --t) {
            float* row = dk0 + (int64_t)t * r;
            const float *ft = fq + (int64_t)t * r, *kt = k0 + (int64_t)t * r;
            unrotated_grad(sh, dK.data() + (int64_t)t * r, row, ddiag[t], ft, cs, sn, t);
            axpy(dden[t], ft, wsum.data(), r);
            const float* ws = wsum.data();
            float total = 0.f;
#pragma omp simd reduction(+ : total)
            for (int i = 0; i < r; ++i) {
              row[i] = (row[i] + ws[i]) * kt[i];
              total += row[i];
            }
            dksb[sb.s + t] = total;
          }
          std::copy(wsum.begin(), wsum.end(), dzb);
          gemm(false, false, l, d, r, 1.f, dfq, r, p.Ws, d, 0.f, dqb + sb.s * d, d);
          gemm(false, false, l, d, r, 1.f, dk0, r, p.Ws, d, 0.f, dkb + sb.s * d, d);
          for (int t = 0; t < l; ++t) {
            const int64_t n = sb.s + t;
            axpy(-(float)scale2 * dksb[n], p.k.at(bh, n), dkb + n * d, d);
          }
          const float ein = (float)std::exp(sb.M_before - sb.P);
          scale_state(ein, dSb, dzb, r, dv);
        }
      }
    }
  });
  return {dq, dk, dvv, dks, dS, dz};
}

}  // namespace

void bind_causal(pybind11::module& m) {
  m.def("causal_forward", &causal_forward, "causal eq. 19 with FAVOR+ features, the forward (see causal_cpu.cpp)");
  m.def("causal_backward", &causal_backward, "causal eq. 19 with FAVOR+ features, the backward (see causal_cpu.cpp)");
}
