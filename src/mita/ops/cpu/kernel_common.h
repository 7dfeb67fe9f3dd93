// Building blocks shared by the fused CPU kernels (kernel.cpp, and any other kernel source built by
// build.py): vector types, exp, the register-blocked micro-kernels, expert packing and top-k.
// Everything is inline in namespace mita_kernels; each kernel library compiles its own copy.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <tuple>
#include <vector>

#ifdef __AVX512F__
#include <immintrin.h>
#endif

namespace mita_kernels {

constexpr int64_t QB = 4;  // queries per register block

typedef float vfloat __attribute__((vector_size(64)));
typedef double vdouble __attribute__((vector_size(64)));
template <typename T>
struct VT;
template <>
struct VT<float> {
  using v = vfloat;
  static constexpr int64_t L = 16;
};
template <>
struct VT<double> {
  using v = vdouble;
  static constexpr int64_t L = 8;
};

template <typename T>
inline typename VT<T>::v vload(const T* p) {
  typename VT<T>::v x;
  std::memcpy(&x, p, sizeof(x));
  return x;
}
template <typename T>
inline void vstore(T* p, typename VT<T>::v x) {
  std::memcpy(p, &x, sizeof(x));
}

inline int64_t round_up(int64_t x, int64_t to) { return (x + to - 1) / to * to; }

template <typename T>
constexpr T neg_inf() {
  return -std::numeric_limits<T>::infinity();
}

// exp over an array. float: a Cephes-style polynomial the compiler vectorises (std::exp does not),
// relative error ~2 ulp, exactly 0 below -87 (so -inf, the mark of a dropped key, gives weight 0).
template <typename T>
inline void exp_inplace(T* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) x[i] = std::exp(x[i]);
}

template <>
inline void exp_inplace<float>(float* __restrict x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const float v = x[i];
    // NaN compares false everywhere: "v >= -87 ? v : -87" sends it to the clamp, so the conversion to int
    // below never sees NaN (undefined behaviour); "+ (v - v)" (0, or NaN for NaN/inf) puts it back. Both
    // are plain selects and adds, so the loop stays vectorised.
    float c = v >= -87.0f ? v : -87.0f;
    c = c > 88.0f ? 88.0f : c;
    const int32_t ni = static_cast<int32_t>(c * 1.44269504088896341f + 128.5f) - 128;  // round(c/ln 2)
    const float fn = static_cast<float>(ni);
    float r = c - fn * 0.693359375f;
    r = r + fn * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    const float y = p * r * r + r + 1.0f;
    const float two_n = __builtin_bit_cast(float, (ni + 127) << 23);
    x[i] = v < -87.0f ? 0.0f : y * two_n + (v - v);
  }
}

// Max and sum of x[0..np), np a multiple of the vector length: vector partials, then one fixed-order
// tree over the lanes (a scalar loop would be one long dependency chain); AVX-512's reduce sequences
// where the CPU has them (a fixed order of shuffles too).
#ifdef __AVX512F__
template <typename T>
inline T lanes_max(typename VT<T>::v a);
template <>
inline float lanes_max<float>(vfloat a) {
  return _mm512_reduce_max_ps(reinterpret_cast<__m512>(a));
}
template <>
inline double lanes_max<double>(vdouble a) {
  return _mm512_reduce_max_pd(reinterpret_cast<__m512d>(a));
}
template <typename T>
inline T lanes_sum(typename VT<T>::v a);
template <>
inline float lanes_sum<float>(vfloat a) {
  return _mm512_reduce_add_ps(reinterpret_cast<__m512>(a));
}
template <>
inline double lanes_sum<double>(vdouble a) {
  return _mm512_reduce_add_pd(reinterpret_cast<__m512d>(a));
}
#else
template <typename T>
inline T lanes_max(typename VT<T>::v a) {
  T r[VT<T>::L];
  std::memcpy(r, &a, sizeof(a));
  for (int64_t w = VT<T>::L / 2; w >= 1; w /= 2)
    for (int64_t i = 0; i < w; ++i) r[i] = r[i] < r[i + w] ? r[i + w] : r[i];
  return r[0];
}
template <typename T>
inline T lanes_sum(typename VT<T>::v a) {
  T r[VT<T>::L];
  std::memcpy(r, &a, sizeof(a));
  for (int64_t w = VT<T>::L / 2; w >= 1; w /= 2)
    for (int64_t i = 0; i < w; ++i) r[i] += r[i + w];
  return r[0];
}
#endif
template <typename T>
inline T padded_max(const T* x, int64_t np) {
  using v = typename VT<T>::v;
  v a = vload(x);
  for (int64_t j = VT<T>::L; j < np; j += VT<T>::L) {
    const v b = vload(x + j);
    a = a < b ? b : a;
  }
  return lanes_max<T>(a);
}
template <typename T>
inline T padded_sum(const T* x, int64_t np) {
  using v = typename VT<T>::v;
  v a = vload(x);
  for (int64_t j = VT<T>::L; j < np; j += VT<T>::L) a += vload(x + j);
  return lanes_sum<T>(a);
}

// Index of the first maximum of row[0..n), or of the first NaN if there is one (torch.argmax's rule);
// 0 when every entry is -inf. One bounded pass: a search for a value that is not there (NaN != NaN)
// must never walk past the row.
template <typename T>
inline int64_t first_argmax(const T* row, int64_t n) {
  int64_t best = 0;
  for (int64_t j = 0; j < n; ++j) {
    const T x = row[j];
    if (x != x) return j;
    if (x > row[best]) best = j;
  }
  return best;
}

// dst[c] += src[c] (no aliasing: the compiler vectorises it)
template <typename T>
inline void add_row(T* __restrict dst, const T* __restrict src, int64_t n) {
  for (int64_t c = 0; c < n; ++c) dst[c] += src[c];
}

// sum_c a[c] b[c]: vector partials, then a fixed-order lane tree and the scalar tail
template <typename T>
inline T dot_row(const T* a, const T* b, int64_t n) {
  using v = typename VT<T>::v;
  constexpr int64_t L = VT<T>::L;
  int64_t c = 0;
  T acc = T(0);
  if (n >= L) {
    v s = vload(a) * vload(b);
    for (c = L; c + L <= n; c += L) s += vload(a + c) * vload(b + c);
    acc = lanes_sum<T>(s);
  }
  for (; c < n; ++c) acc += a[c] * b[c];
  return acc;
}

// ---- micro-kernels over QB rows; every padded extent (Jp, Ep) is a multiple of the vector length ----

// out[q][j] = sum_c x[q][c] * bt[c][j]   (x: QB row pointers; bt: [dx][Jp] of row stride ldb; out: [QB][Jp]
// of row stride ldo; both strides default to Jp)
// Two output vectors at a time where they fit: 8 independent accumulators keep both FMA ports busy.
template <typename T>
inline void mk_xbt(const T* const* x, const T* bt, int64_t dx, int64_t jp, T* out, int64_t ldb = -1,
                   int64_t ldo = -1) {
  if (ldb < 0) ldb = jp;
  if (ldo < 0) ldo = jp;
  using v = typename VT<T>::v;
  constexpr int64_t L = VT<T>::L;
  const T *x0 = x[0], *x1 = x[1], *x2 = x[2], *x3 = x[3];
  int64_t j0 = 0;
  for (; j0 + 2 * L <= jp; j0 += 2 * L) {
    v a0 = {}, a1 = {}, a2 = {}, a3 = {}, b0 = {}, b1 = {}, b2 = {}, b3 = {};
    for (int64_t c = 0; c < dx; ++c) {
      const v u = vload(bt + c * ldb + j0), w = vload(bt + c * ldb + j0 + L);
      const T s0 = x0[c], s1 = x1[c], s2 = x2[c], s3 = x3[c];
      a0 += s0 * u;
      b0 += s0 * w;
      a1 += s1 * u;
      b1 += s1 * w;
      a2 += s2 * u;
      b2 += s2 * w;
      a3 += s3 * u;
      b3 += s3 * w;
    }
    vstore(out + j0, a0);
    vstore(out + j0 + L, b0);
    vstore(out + ldo + j0, a1);
    vstore(out + ldo + j0 + L, b1);
    vstore(out + 2 * ldo + j0, a2);
    vstore(out + 2 * ldo + j0 + L, b2);
    vstore(out + 3 * ldo + j0, a3);
    vstore(out + 3 * ldo + j0 + L, b3);
  }
  for (; j0 < jp; j0 += L) {
    v a0 = {}, a1 = {}, a2 = {}, a3 = {};
    for (int64_t c = 0; c < dx; ++c) {
      const v b = vload(bt + c * ldb + j0);
      a0 += x0[c] * b;
      a1 += x1[c] * b;
      a2 += x2[c] * b;
      a3 += x3[c] * b;
    }
    vstore(out + j0, a0);
    vstore(out + ldo + j0, a1);
    vstore(out + 2 * ldo + j0, a2);
    vstore(out + 3 * ldo + j0, a3);
  }
}

// acc[q][e] += sum_j p[q][j] * b[j][e]   (p: QB rows of stride ldp; b: [jn][Ep]; acc: QB row pointers)
template <typename T>
inline void mk_pb(const T* p, int64_t ldp, const T* b, int64_t jn, int64_t ep, T* const* acc) {
  using v = typename VT<T>::v;
  constexpr int64_t L = VT<T>::L;
  T *r0 = acc[0], *r1 = acc[1], *r2 = acc[2], *r3 = acc[3];
  const T *p0 = p, *p1 = p + ldp, *p2 = p + 2 * ldp, *p3 = p + 3 * ldp;
  int64_t e0 = 0;
  for (; e0 + 2 * L <= ep; e0 += 2 * L) {
    v a0 = vload(r0 + e0), a1 = vload(r1 + e0), a2 = vload(r2 + e0), a3 = vload(r3 + e0);
    v b0 = vload(r0 + e0 + L), b1 = vload(r1 + e0 + L), b2 = vload(r2 + e0 + L), b3 = vload(r3 + e0 + L);
    for (int64_t j = 0; j < jn; ++j) {
      const v u = vload(b + j * ep + e0), w = vload(b + j * ep + e0 + L);
      const T s0 = p0[j], s1 = p1[j], s2 = p2[j], s3 = p3[j];
      a0 += s0 * u;
      b0 += s0 * w;
      a1 += s1 * u;
      b1 += s1 * w;
      a2 += s2 * u;
      b2 += s2 * w;
      a3 += s3 * u;
      b3 += s3 * w;
    }
    vstore(r0 + e0, a0);
    vstore(r0 + e0 + L, b0);
    vstore(r1 + e0, a1);
    vstore(r1 + e0 + L, b1);
    vstore(r2 + e0, a2);
    vstore(r2 + e0 + L, b2);
    vstore(r3 + e0, a3);
    vstore(r3 + e0 + L, b3);
  }
  for (; e0 < ep; e0 += L) {
    v a0 = vload(r0 + e0), a1 = vload(r1 + e0), a2 = vload(r2 + e0), a3 = vload(r3 + e0);
    for (int64_t j = 0; j < jn; ++j) {
      const v bj = vload(b + j * ep + e0);
      a0 += p0[j] * bj;
      a1 += p1[j] * bj;
      a2 += p2[j] * bj;
      a3 += p3[j] * bj;
    }
    vstore(r0 + e0, a0);
    vstore(r1 + e0, a1);
    vstore(r2 + e0, a2);
    vstore(r3 + e0, a3);
  }
}

// acc[j][e] += sum_q g[q][j] * x[q][e]   (g: QB rows of stride ldg; x: [QB][Ep]; acc: [jn][Ep])
template <typename T>
inline void mk_rank(const T* g, int64_t ldg, const T* x, int64_t jn, int64_t ep, T* acc) {
  using v = typename VT<T>::v;
  for (int64_t e0 = 0; e0 < ep; e0 += VT<T>::L) {
    const v x0 = vload(x + e0), x1 = vload(x + ep + e0), x2 = vload(x + 2 * ep + e0),
            x3 = vload(x + 3 * ep + e0);
    for (int64_t j = 0; j < jn; ++j) {
      v a = vload(acc + j * ep + e0);
      a += g[j] * x0;
      a += g[ldg + j] * x1;
      a += g[2 * ldg + j] * x2;
      a += g[3 * ldg + j] * x3;
      vstore(acc + j * ep + e0, a);
    }
  }
}

// acc[j][e] += sum_{q < nq} g[q][j] * x[q][e]   (g: rows of stride ldg; x: rows of stride ldx, each Ep
// wide; acc: [jn][Ep]). All of an expert's queries at once, eight rows of acc in registers: each acc
// vector is loaded and stored once per call instead of once per QB queries.
template <typename T>
inline void mk_rank_n(const T* g, int64_t ldg, const T* x, int64_t ldx, int64_t nq, int64_t jn, int64_t ep,
                      T* acc) {
  using v = typename VT<T>::v;
  constexpr int64_t L = VT<T>::L;
  for (int64_t e0 = 0; e0 < ep; e0 += L) {
    int64_t j = 0;
    for (; j + 8 <= jn; j += 8) {
      T* r = acc + j * ep + e0;
      v a0 = vload(r), a1 = vload(r + ep), a2 = vload(r + 2 * ep), a3 = vload(r + 3 * ep);
      v a4 = vload(r + 4 * ep), a5 = vload(r + 5 * ep), a6 = vload(r + 6 * ep), a7 = vload(r + 7 * ep);
      for (int64_t q = 0; q < nq; ++q) {
        const v xv = vload(x + q * ldx + e0);
        const T* gq = g + q * ldg + j;
        a0 += gq[0] * xv;
        a1 += gq[1] * xv;
        a2 += gq[2] * xv;
        a3 += gq[3] * xv;
        a4 += gq[4] * xv;
        a5 += gq[5] * xv;
        a6 += gq[6] * xv;
        a7 += gq[7] * xv;
      }
      vstore(r, a0);
      vstore(r + ep, a1);
      vstore(r + 2 * ep, a2);
      vstore(r + 3 * ep, a3);
      vstore(r + 4 * ep, a4);
      vstore(r + 5 * ep, a5);
      vstore(r + 6 * ep, a6);
      vstore(r + 7 * ep, a7);
    }
    for (; j < jn; ++j) {
      v a = vload(acc + j * ep + e0);
      for (int64_t q = 0; q < nq; ++q) a += g[q * ldg + j] * vload(x + q * ldx + e0);
      vstore(acc + j * ep + e0, a);
    }
  }
}

struct Sizes {
  int64_t n, nk, d, dv, m, kk, s, group, heads;
  bool shared, routed;
  int64_t dp, ep, kp, mp;  // padded d, dv, k, m
};

template <typename T>
Sizes make_sizes(int64_t n, int64_t nk, int64_t d, int64_t dv, int64_t m, int64_t kk, int64_t s,
                 int64_t group, int64_t heads, bool shared, bool routed) {
  const int64_t L = VT<T>::L;
  return Sizes{n,      nk,     d, dv, m, kk, s, group, heads, shared, routed, round_up(d, L), round_up(dv, L),
               round_up(kk, L), round_up(m, L)};
}

// Pairs (query, rank) with an expert (eidx >= 0; -1 = none, as in causal block 0), sorted by expert with a
// stable counting sort: the pairs of expert e are order[start[e] .. start[e + 1]). eidx < m is checked at
// the boundary.
inline void bucket_pairs(const int64_t* eidx, int64_t pairs, int64_t m, std::vector<int64_t>& start,
                         std::vector<int64_t>& order) {
  std::fill(start.begin(), start.end(), 0);
  for (int64_t p = 0; p < pairs; ++p)
    if (eidx[p] >= 0) start[eidx[p] + 1]++;
  for (int64_t e = 0; e < m; ++e) start[e + 1] += start[e];
  std::vector<int64_t> fill(start.begin(), start.end() - 1);
  for (int64_t p = 0; p < pairs; ++p)
    if (eidx[p] >= 0) order[fill[eidx[p]]++] = p;
}

// Fold logits l[0..jp) (already scaled, -inf = dropped) into one query's online softmax (max m, sum zsum,
// accumulator acc[0..ep)); l becomes the unnormalised weights for acc. Returns false (l zeroed) when every
// logit is -inf.
template <typename T>
inline bool online_fold(T* l, int64_t jp, T& m, T& zsum, T* acc, int64_t ep) {
  const T lmx = padded_max(l, jp);
  if (lmx == neg_inf<T>()) {
    std::fill(l, l + jp, T(0));
    return false;
  }
  const T new_m = std::max(m, lmx);
  const T alpha = m == neg_inf<T>() ? T(0) : std::exp(m - new_m);
  for (int64_t j = 0; j < jp; ++j) l[j] -= new_m;
  exp_inplace(l, jp);
  zsum = zsum * alpha + padded_sum(l, jp);
  m = new_m;
  if (alpha != T(1))
    for (int64_t c = 0; c < ep; ++c) acc[c] *= alpha;
  return true;
}

// One (batch, query head) as the attention steps of both kernels see it.
//   q [N][d]; k [N_kv][d], v [N_kv][dv] (its key/value head); sv [m][dv] the shared values (null: no
//   shared expert); qr [N][m] the shared logits' products (non-causal) or r [n_l][d] the landmarks
//   (causal, which forms them itself); kidx [m][k] each landmark's key set (-1: an unfilled slot);
//   eidx [N][s] the experts (null: argmax routing computed here; -1: none); pad [N_kv] and dup [N*s][k]
//   (null: none). Shapes and index ranges are checked at the op boundary.
template <typename T>
struct HeadIn {
  const T *q, *k, *v, *sv, *qr, *r;
  const int64_t *kidx, *eidx;
  const bool *pad, *dup;
};
// The forward's outputs for one head: out rows (row stride ld), lse [N], the argmax routing [N] (null
// when given).
template <typename T>
struct HeadOut {
  T* out;
  int64_t ld;
  T* lse;
  int64_t* eidx;
};
// The backward's extra inputs (out, lse, dout [N][dv]) and its outputs: dq, dk and dv rows, d qr
// (non-causal) or d r (causal), d shared values.
template <typename T>
struct HeadGrad {
  const T *out, *lse, *dout;
  T *dq, *dk, *dv, *dqr, *dr, *dsv;
};

// dst[j] = src[idx[j]] for j < n and 0 for n <= j < np (np a multiple of the vector length, idx 32-bit
// element offsets). AVX-512: masked vector gathers (the compiler's own code for the loop inserts one
// element at a time).
template <typename T>
inline void gather_padded(T* __restrict dst, const T* __restrict src, const int32_t* __restrict idx, int64_t n,
                          int64_t np) {
  for (int64_t j = 0; j < n; ++j) dst[j] = src[idx[j]];
  for (int64_t j = n; j < np; ++j) dst[j] = T(0);
}
#ifdef __AVX512F__
template <>
inline void gather_padded<float>(float* __restrict dst, const float* __restrict src,
                                 const int32_t* __restrict idx, int64_t n, int64_t np) {
  for (int64_t j = 0; j < np; j += 16) {
    const int64_t left = n - j;
    const __mmask16 mask = left >= 16 ? __mmask16(0xFFFF) : left <= 0 ? __mmask16(0) : __mmask16((1u << left) - 1);
    const __m512i ix = _mm512_maskz_loadu_epi32(mask, idx + j);
    _mm512_storeu_ps(dst + j, _mm512_mask_i32gather_ps(_mm512_setzero_ps(), mask, ix, src, 4));
  }
}
template <>
inline void gather_padded<double>(double* __restrict dst, const double* __restrict src,
                                  const int32_t* __restrict idx, int64_t n, int64_t np) {
  for (int64_t j = 0; j < np; j += 8) {
    const int64_t left = n - j;
    const __mmask8 mask = left >= 8 ? __mmask8(0xFF) : left <= 0 ? __mmask8(0) : __mmask8((1u << left) - 1);
    const __m256i ix = _mm256_maskz_loadu_epi32(mask, idx + j);
    _mm512_storeu_pd(dst + j, _mm512_mask_i32gather_pd(_mm512_setzero_pd(), mask, ix, src, 8));
  }
}
#endif

// dst[c][t] = src[t][c] for t < n, c < w (src rows of stride lds, dst rows of stride ldd >= n; dst's
// columns n..ldd are left alone). float with AVX-512: 16 x 16 tiles transposed in registers.
template <typename T>
inline void transpose_rows(const T* src, int64_t n, int64_t w, int64_t lds, T* dst, int64_t ldd) {
  for (int64_t t = 0; t < n; ++t)
    for (int64_t c = 0; c < w; ++c) dst[c * ldd + t] = src[t * lds + c];
}
#ifdef __AVX512F__
inline void transpose16(const float* src, int64_t lds, float* dst, int64_t ldd) {
  __m512 r[16], t[16], o[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_ps(src + i * lds);
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
  // r[4g + p]: in each 128-bit lane j, column 4j + p of rows 4g .. 4g + 3
  for (int g = 0; g < 16; g += 4) {
    r[g] = _mm512_shuffle_ps(t[g], t[g + 2], 0x44);
    r[g + 1] = _mm512_shuffle_ps(t[g], t[g + 2], 0xEE);
    r[g + 2] = _mm512_shuffle_ps(t[g + 1], t[g + 3], 0x44);
    r[g + 3] = _mm512_shuffle_ps(t[g + 1], t[g + 3], 0xEE);
  }
  // gather lane j of r[p], r[4 + p], r[8 + p], r[12 + p] into output row 4j + p
  for (int p = 0; p < 4; ++p) {
    const __m512 x = _mm512_shuffle_f32x4(r[p], r[4 + p], 0x88), y = _mm512_shuffle_f32x4(r[p], r[4 + p], 0xDD);
    const __m512 x2 = _mm512_shuffle_f32x4(r[8 + p], r[12 + p], 0x88);
    const __m512 y2 = _mm512_shuffle_f32x4(r[8 + p], r[12 + p], 0xDD);
    o[p] = _mm512_shuffle_f32x4(x, x2, 0x88);
    o[8 + p] = _mm512_shuffle_f32x4(x, x2, 0xDD);
    o[4 + p] = _mm512_shuffle_f32x4(y, y2, 0x88);
    o[12 + p] = _mm512_shuffle_f32x4(y, y2, 0xDD);
  }
  for (int i = 0; i < 16; ++i) _mm512_storeu_ps(dst + i * ldd, o[i]);
}
template <>
inline void transpose_rows<float>(const float* src, int64_t n, int64_t w, int64_t lds, float* dst, int64_t ldd) {
  int64_t t0 = 0;
  for (; t0 + 16 <= n; t0 += 16) {
    int64_t c0 = 0;
    for (; c0 + 16 <= w; c0 += 16) transpose16(src + t0 * lds + c0, lds, dst + c0 * ldd + t0, ldd);
    for (int64_t t = t0; t < t0 + 16; ++t)
      for (int64_t c = c0; c < w; ++c) dst[c * ldd + t] = src[t * lds + c];
  }
  for (int64_t t = t0; t < n; ++t)
    for (int64_t c = 0; c < w; ++c) dst[c * ldd + t] = src[t * lds + c];
}
#endif

// One expert's keys transposed [d][Kp], keys [k][Dp], values [k][Ep], values transposed [dv][Kp] (zero
// padded: the padding is written once and never touched), and a bias row [Kp] that is -inf for padded
// keys, for unfilled slots (key index -1: they read key 0) and for the padding columns j >= k. The
// transposes are gathered straight from the head's K and V rows (k [N_kv][d], v [N_kv][dv]; offsets fit
// 32 bits, checked by the callers), so no head-wide transposed copy is needed.
template <typename T>
struct ExpertBuf {
  std::vector<T> kt, kr, vp, vt, bias;
  std::vector<int64_t> rows;
  std::vector<int32_t> koff, voff;
  ExpertBuf(const Sizes& z, bool backward)
      : kt(z.d * z.kp, T(0)), kr(backward ? z.kk * z.dp : 0, T(0)), vp(z.kk * z.ep, T(0)),
        vt(backward ? z.dv * z.kp : 0, T(0)), bias(z.kp, neg_inf<T>()), rows(z.kk), koff(z.kk), voff(z.kk) {}
  void pack(const T* k, const T* v, const int64_t* ki, const bool* pad, const Sizes& z) {
    for (int64_t j = 0; j < z.kk; ++j) {
      rows[j] = ki[j] < 0 ? 0 : ki[j];
      koff[j] = static_cast<int32_t>(rows[j] * z.d);
      voff[j] = static_cast<int32_t>(rows[j] * z.dv);
      bias[j] = (ki[j] < 0 || (pad != nullptr && pad[rows[j]])) ? neg_inf<T>() : T(0);
    }
    for (int64_t c = 0; c < z.d; ++c) gather_padded(kt.data() + c * z.kp, k + c, koff.data(), z.kk, z.kp);
    for (int64_t j = 0; j < z.kk; ++j) std::memcpy(vp.data() + j * z.ep, v + rows[j] * z.dv, sizeof(T) * z.dv);
    if (!kr.empty()) {
      for (int64_t j = 0; j < z.kk; ++j) std::memcpy(kr.data() + j * z.dp, k + rows[j] * z.d, sizeof(T) * z.d);
      for (int64_t c = 0; c < z.dv; ++c) gather_padded(vt.data() + c * z.kp, v + c, voff.data(), z.kk, z.kp);
    }
    // Excluded keys (padding, unfilled slots) by selection: zero rows, never weight 0 times their values.
    for (int64_t j = 0; j < z.kk; ++j) {
      if (bias[j] != neg_inf<T>()) continue;
      for (int64_t c = 0; c < z.d; ++c) kt[c * z.kp + j] = T(0);
      std::fill(vp.begin() + j * z.ep, vp.begin() + j * z.ep + z.dv, T(0));
      if (kr.empty()) continue;
      std::fill(kr.begin() + j * z.dp, kr.begin() + j * z.dp + z.d, T(0));
      for (int64_t c = 0; c < z.dv; ++c) vt[c * z.kp + j] = T(0);
    }
  }
};

// Copy up to QB rows (row indices rows[0..nb)) of src [., width] into dst [QB][ld], zero elsewhere.
template <typename T>
inline void gather_rows(const T* src, int64_t width, const int64_t* rows, int64_t nb, int64_t ld, T* dst) {
  std::fill(dst, dst + QB * ld, T(0));
  for (int64_t q = 0; q < nb; ++q) std::memcpy(dst + q * ld, src + rows[q] * width, sizeof(T) * width);
}


// ExpertBuf gathers with 32-bit element offsets key * head dim: every op that packs experts checks this.
inline void check_gather_offsets(const at::Tensor& k, const at::Tensor& v, const char* op) {
  TORCH_CHECK(k.size(2) * std::max(k.size(3), v.size(3)) < (int64_t(1) << 31), op,
              ": N_kv * head dim must be < 2^31 (32-bit gather offsets)");
}

// Checks at the boundary: every tensor a Python caller hands in is checked for the shape the kernels
// address it with, and every index tensor for the range of its values, before any data is read.
inline void check_shape(const at::Tensor& t, std::initializer_list<int64_t> want, const char* op,
                        const char* name) {
  TORCH_CHECK(t.sizes().equals(want), op, ": ", name, " has shape ", t.sizes(), ", expected ",
              at::IntArrayRef(want));
}
inline void check_shape(const std::optional<at::Tensor>& t, std::initializer_list<int64_t> want, const char* op,
                        const char* name) {
  if (t.has_value()) check_shape(*t, want, op, name);
}
// Values of a contiguous int64 tensor in [lo, hi).
inline void check_range(const at::Tensor& idx, int64_t lo, int64_t hi, const char* op, const char* name) {
  TORCH_CHECK(idx.scalar_type() == at::kLong, op, ": ", name, " must be int64");
  const int64_t* p = idx.data_ptr<int64_t>();
  for (int64_t i = 0, n = idx.numel(); i < n; ++i)
    TORCH_CHECK(p[i] >= lo && p[i] < hi, op, ": ", name, " holds ", p[i], ", outside [", lo, ", ", hi, ")");
}
inline void check_mask(const std::optional<at::Tensor>& t, std::initializer_list<int64_t> want, const char* op,
                       const char* name) {
  if (!t.has_value()) return;
  TORCH_CHECK(t->scalar_type() == at::kBool, op, ": ", name, " must be bool");
  check_shape(*t, want, op, name);
}

template <typename T>
const T* ptr_or_null(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->data_ptr<T>() : nullptr;
}

inline std::optional<at::Tensor> contiguous_opt(const std::optional<at::Tensor>& t) {
  if (!t.has_value()) return std::nullopt;
  return t->contiguous();
}


// Every NaN (either sign) maps to the largest key: torch.topk ranks NaN above +inf.
// Selects, not an early return, so the key loops stay vectorised.
inline uint32_t sort_key(float x) {
  const uint32_t b = __builtin_bit_cast(uint32_t, x);
  const uint32_t key = (b & 0x80000000u) ? ~b : (b | 0x80000000u);
  return x == x ? key : ~uint32_t(0);
}
inline uint64_t sort_key(double x) {
  const uint64_t b = __builtin_bit_cast(uint64_t, x);
  const uint64_t key = (b & 0x8000000000000000ull) ? ~b : (b | 0x8000000000000000ull);
  return x == x ? key : ~uint64_t(0);
}

template <typename K>
inline int64_t count_at_least(const K* __restrict keys, int64_t n, K t) {
  int64_t c = 0;
  for (int64_t i = 0; i < n; ++i) c += keys[i] >= t;  // vectorised compare-and-count
  return c;
}

// dst <- the indices t (increasing) with keys[t] >= thr. AVX-512: compare 16 (8) keys at once and
// compress-store their indices (the scalar loop's data-dependent branch mispredicts half the time).
template <typename K>
inline void select_at_least(const K* keys, int64_t n, K thr, int64_t* dst) {
  int64_t o = 0;
  for (int64_t t = 0; t < n; ++t)
    if (keys[t] >= thr) dst[o++] = t;
}
#ifdef __AVX512F__
template <>
inline void select_at_least<uint32_t>(const uint32_t* keys, int64_t n, uint32_t thr, int64_t* dst) {
  const __m512i tv = _mm512_set1_epi32(static_cast<int>(thr));
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  int64_t o = 0, t = 0;
  for (; t + 16 <= n && n <= (int64_t(1) << 31); t += 16) {
    const __mmask16 hit = _mm512_cmpge_epu32_mask(_mm512_loadu_si512(keys + t), tv);
    if (hit == 0) continue;
    const __m512i idx = _mm512_add_epi32(lane, _mm512_set1_epi32(static_cast<int>(t)));
    const __m512i packed = _mm512_maskz_compress_epi32(hit, idx);
    const int cnt = __builtin_popcount(hit);
    // widen the cnt indices to 64 bits, two halves of 8, storing only those (dst holds exactly k)
    const __mmask8 lo8 = static_cast<__mmask8>(cnt >= 8 ? 0xFF : (1u << cnt) - 1);
    _mm512_mask_storeu_epi64(dst + o, lo8, _mm512_cvtepu32_epi64(_mm512_castsi512_si256(packed)));
    if (cnt > 8) {
      const __mmask8 hi8 = static_cast<__mmask8>((1u << (cnt - 8)) - 1);
      _mm512_mask_storeu_epi64(dst + o + 8, hi8, _mm512_cvtepu32_epi64(_mm512_extracti64x4_epi64(packed, 1)));
    }
    o += cnt;
  }
  for (; t < n; ++t)
    if (keys[t] >= thr) dst[o++] = t;
}
#endif

// Indices of the k largest entries of row[0..n), in increasing index order; among equal scores the lower
// indices are taken, so the choice is deterministic. Bisection on the threshold key: the largest T with
// at least k keys >= T is the k-th largest key; each step is one vectorised counting pass, and the search
// stops early once some threshold has exactly k keys at or above it.
template <typename T>
void topk_row(const T* row, int64_t n, int64_t k, int64_t* dst, std::vector<decltype(sort_key(T()))>& keys) {
  using K = decltype(sort_key(T()));
  K lo = ~K(0), hi = 0;
  for (int64_t t = 0; t < n; ++t) {
    const K x = sort_key(row[t]);
    keys[t] = x;
    lo = x < lo ? x : lo;
    hi = x > hi ? x : hi;
  }
  // Invariant: count(>= lo) >= k, count(>= hi + 1) < k (hi + 1 may be past the largest key).
  K thr = lo;
  bool exact = false;
  while (lo < hi) {
    const K mid = lo + (hi - lo) / 2 + 1;  // in (lo, hi]
    const int64_t c = count_at_least(keys.data(), n, mid);
    if (c == k) {
      thr = mid;
      exact = true;
      break;
    }
    if (c > k) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  if (!exact) thr = lo;
  int64_t o = 0;
  if (exact) {
    select_at_least(keys.data(), n, thr, dst);
    return;
  }
  // thr is the k-th largest key: take every key above it, then the first ties in index order.
  int64_t ties = k - (count_at_least(keys.data(), n, thr) - [&] {
                   int64_t e = 0;
                   for (int64_t t = 0; t < n; ++t) e += keys[t] == thr;
                   return e;
                 }());
  for (int64_t t = 0; t < n; ++t) {
    if (keys[t] > thr) {
      dst[o++] = t;
    } else if (keys[t] == thr && ties > 0) {
      dst[o++] = t;
      --ties;
    }
  }
}

}  // namespace mita_kernels
