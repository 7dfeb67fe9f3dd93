// Fused CPU kernels of MiTA (SPEC §2): top-k selection, routing and the one-softmax attention step.
//
// torch computes the dense landmark products (R K^T, its softmax, A = P V and Q R^T); these kernels do
// the rest without gathered copies, per (batch, query head):
//   forward:  each query's accumulator opens with its m shared logits (one online softmax, routing by
//             argmax on the way); then, expert by expert, the expert's k keys and values are packed once
//             into a small padded buffer that stays in cache while the queries routed to it, QB at a
//             time, fold their k logits into their accumulators.
//   backward: the same order, recomputing probabilities from the saved log-sum-exp; an expert's dK/dV
//             accumulate in a local buffer and are added to the head's rows once per expert.
// Inner products are register-blocked micro-kernels over QB queries x one vector of outputs, written
// with GCC vector extensions (AVX-512 where the CPU has it, narrower vectors otherwise).
// Work is split over (batch, query head) with at::parallel_for; each item is computed by one thread in a
// fixed order, so results do not depend on the thread count. GQA heads write their own dK/dV rows
// (summed over the group by the caller), so no two threads write the same memory.

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

namespace {

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
    float c = v < -87.0f ? -87.0f : v;
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
    x[i] = v < -87.0f ? 0.0f : y * two_n;
  }
}

// Max and sum of x[0..np), np a multiple of the vector length: vector partials, then one fixed-order
// tree over the lanes (a scalar loop would be one long dependency chain).
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

// ---- micro-kernels over QB rows; every padded extent (Jp, Ep) is a multiple of the vector length ----

// out[q][j] = sum_c x[q][c] * bt[c][j]   (x: QB row pointers; bt: [dx][Jp]; out: [QB][Jp])
template <typename T>
inline void mk_xbt(const T* const* x, const T* bt, int64_t dx, int64_t jp, T* out) {
  using v = typename VT<T>::v;
  const T *x0 = x[0], *x1 = x[1], *x2 = x[2], *x3 = x[3];
  for (int64_t j0 = 0; j0 < jp; j0 += VT<T>::L) {
    v a0 = {}, a1 = {}, a2 = {}, a3 = {};
    for (int64_t c = 0; c < dx; ++c) {
      const v b = vload(bt + c * jp + j0);
      a0 += x0[c] * b;
      a1 += x1[c] * b;
      a2 += x2[c] * b;
      a3 += x3[c] * b;
    }
    vstore(out + j0, a0);
    vstore(out + jp + j0, a1);
    vstore(out + 2 * jp + j0, a2);
    vstore(out + 3 * jp + j0, a3);
  }
}

// acc[q][e] += sum_j p[q][j] * b[j][e]   (p: QB rows of stride ldp; b: [jn][Ep]; acc: QB row pointers)
template <typename T>
inline void mk_pb(const T* p, int64_t ldp, const T* b, int64_t jn, int64_t ep, T* const* acc) {
  using v = typename VT<T>::v;
  T *r0 = acc[0], *r1 = acc[1], *r2 = acc[2], *r3 = acc[3];
  for (int64_t e0 = 0; e0 < ep; e0 += VT<T>::L) {
    v a0 = vload(r0 + e0), a1 = vload(r1 + e0), a2 = vload(r2 + e0), a3 = vload(r3 + e0);
    for (int64_t j = 0; j < jn; ++j) {
      const v bj = vload(b + j * ep + e0);
      a0 += p[j] * bj;
      a1 += p[ldp + j] * bj;
      a2 += p[2 * ldp + j] * bj;
      a3 += p[3 * ldp + j] * bj;
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

// Pairs (query, rank) sorted by expert with a stable counting sort: start[e]..start[e+1] in `order`.
inline void bucket_pairs(const int64_t* eidx, const Sizes& z, std::vector<int64_t>& start,
                         std::vector<int64_t>& order) {
  const int64_t pairs = z.n * z.s;
  std::fill(start.begin(), start.end(), 0);
  for (int64_t p = 0; p < pairs; ++p) start[eidx[p] + 1]++;
  for (int64_t e = 0; e < z.m; ++e) start[e + 1] += start[e];
  std::vector<int64_t> fill(start.begin(), start.end() - 1);
  for (int64_t p = 0; p < pairs; ++p) order[fill[eidx[p]]++] = p;
}

// dst[j] = src[idx[j]]: with 32-bit indices and no aliasing the compiler emits vector gathers.
template <typename T>
inline void gather(T* __restrict dst, const T* __restrict src, const int32_t* __restrict idx, int64_t n) {
  for (int64_t j = 0; j < n; ++j) dst[j] = src[idx[j]];
}

// One expert's keys transposed [d][Kp], keys [k][Dp], values [k][Ep], values transposed [dv][Kp] (zero
// padded: the padding is written once and never touched), and a bias row [Kp] that is -inf for padded
// keys and for the padding columns j >= k. kt_head / vt_head: the head's K^T [d][N_kv], V^T [dv][N_kv].
template <typename T>
struct ExpertBuf {
  std::vector<T> kt, kr, vp, vt, bias;
  std::vector<int32_t> ki32;
  ExpertBuf(const Sizes& z, bool backward)
      : kt(z.d * z.kp, T(0)), kr(backward ? z.kk * z.dp : 0, T(0)), vp(z.kk * z.ep, T(0)),
        vt(backward ? z.dv * z.kp : 0, T(0)), bias(z.kp, neg_inf<T>()), ki32(z.kk) {}
  void pack(const T* k, const T* v, const T* kt_head, const T* vt_head, const int64_t* ki, const bool* pad,
            const Sizes& z) {
    for (int64_t j = 0; j < z.kk; ++j) ki32[j] = static_cast<int32_t>(ki[j]);
    for (int64_t c = 0; c < z.d; ++c) gather(kt.data() + c * z.kp, kt_head + c * z.nk, ki32.data(), z.kk);
    for (int64_t j = 0; j < z.kk; ++j) {
      std::memcpy(vp.data() + j * z.ep, v + ki[j] * z.dv, sizeof(T) * z.dv);
      bias[j] = (pad != nullptr && pad[ki[j]]) ? neg_inf<T>() : T(0);
    }
    if (kr.empty()) return;
    for (int64_t j = 0; j < z.kk; ++j) std::memcpy(kr.data() + j * z.dp, k + ki[j] * z.d, sizeof(T) * z.d);
    for (int64_t c = 0; c < z.dv; ++c) gather(vt.data() + c * z.kp, vt_head + c * z.nk, ki32.data(), z.kk);
  }
};

// Copy up to QB rows (row indices rows[0..nb)) of src [., width] into dst [QB][ld], zero elsewhere.
template <typename T>
inline void gather_rows(const T* src, int64_t width, const int64_t* rows, int64_t nb, int64_t ld, T* dst) {
  std::fill(dst, dst + QB * ld, T(0));
  for (int64_t q = 0; q < nb; ++q) std::memcpy(dst + q * ld, src + rows[q] * width, sizeof(T) * width);
}

template <typename T>
void forward_head(const T* q, const T* k, const T* v, const T* kt_head, const T* qr, const T* sv,
                  const int64_t* kidx,
                  const int64_t* eidx_in, const bool* pad, const bool* dup, T scale, T lam, const Sizes& z,
                  T* out, T* lse, int64_t* eidx_out) {
  std::vector<T> acc(z.n * z.ep, T(0)), acc_m(z.n), acc_z(z.n);
  std::vector<T> w(QB * std::max(z.mp, z.kp)), zero_row(z.dp, T(0)), junk(z.ep);
  const T* xr[QB];
  T* ar[QB];
  // Shared expert (and s = 1 routing): the m landmark logits open each query's online softmax.
  std::vector<T> ap(z.shared ? z.m * z.ep : 0, T(0));
  for (int64_t j = 0; z.shared && j < z.m; ++j) std::memcpy(ap.data() + j * z.ep, sv + j * z.dv, sizeof(T) * z.dv);
  for (int64_t i0 = 0; i0 < z.n; i0 += QB) {
    const int64_t nb = std::min(QB, z.n - i0);
    std::fill(w.begin(), w.end(), T(0));
    for (int64_t b = 0; b < QB; ++b) ar[b] = b < nb ? acc.data() + (i0 + b) * z.ep : junk.data();
    for (int64_t b = 0; b < nb; ++b) {
      const int64_t i = i0 + b;
      const T* row = qr + i * z.m;
      T* wr = w.data() + b * z.mp;
      std::memcpy(wr, row, sizeof(T) * z.m);
      std::fill(wr + z.m, wr + z.mp, neg_inf<T>());
      const T best_score = padded_max(wr, z.mp);
      if (eidx_out != nullptr) {
        int64_t best = 0;
        while (row[best] != best_score) ++best;  // first maximum, as torch.argmax
        eidx_out[i] = best;
      }
      if (!z.shared) {
        acc_m[i] = neg_inf<T>();
        acc_z[i] = T(0);
        continue;
      }
      const T mx = best_score * lam;  // rounding is monotone, so this is the largest shared logit
      for (int64_t j = 0; j < z.mp; ++j) wr[j] = wr[j] * lam - mx;
      exp_inplace(wr, z.mp);
      acc_m[i] = mx;
      acc_z[i] = padded_sum(wr, z.mp);
    }
    if (z.shared) mk_pb(w.data(), z.mp, ap.data(), z.m, z.ep, ar);
  }
  if (z.routed) {
    const int64_t* eidx = eidx_in != nullptr ? eidx_in : eidx_out;
    std::vector<int64_t> start(z.m + 1), order(z.n * z.s);
    bucket_pairs(eidx, z, start, order);
    ExpertBuf<T> eb(z, false);
    for (int64_t e = 0; e < z.m; ++e) {
      if (start[e] == start[e + 1]) continue;
      eb.pack(k, v, kt_head, nullptr, kidx + e * z.kk, pad, z);
      for (int64_t t0 = start[e]; t0 < start[e + 1]; t0 += QB) {
        const int64_t nb = std::min(QB, start[e + 1] - t0);
        for (int64_t b = 0; b < QB; ++b) {
          xr[b] = b < nb ? q + (order[t0 + b] / z.s) * z.d : zero_row.data();
          ar[b] = b < nb ? acc.data() + (order[t0 + b] / z.s) * z.ep : junk.data();
        }
        mk_xbt(xr, eb.kt.data(), z.d, z.kp, w.data());
        for (int64_t b = 0; b < QB; ++b) {
          T* l = w.data() + b * z.kp;
          if (b >= nb) {
            std::fill(l, l + z.kp, T(0));
            continue;
          }
          const int64_t pr = order[t0 + b], i = pr / z.s;
          for (int64_t j = 0; j < z.kp; ++j) l[j] = l[j] * scale + eb.bias[j];
          if (dup != nullptr)
            for (int64_t j = 0; j < z.kk; ++j)
              if (dup[pr * z.kk + j]) l[j] = neg_inf<T>();
          const T lmx = padded_max(l, z.kp);
          if (lmx == neg_inf<T>()) {  // every key of this expert dropped for this query
            std::fill(l, l + z.kp, T(0));
            continue;
          }
          const T new_m = std::max(acc_m[i], lmx);
          const T alpha = acc_m[i] == neg_inf<T>() ? T(0) : std::exp(acc_m[i] - new_m);
          for (int64_t j = 0; j < z.kp; ++j) l[j] -= new_m;
          exp_inplace(l, z.kp);
          acc_z[i] = acc_z[i] * alpha + padded_sum(l, z.kp);
          acc_m[i] = new_m;
          if (alpha != T(1))
            for (int64_t c = 0; c < z.ep; ++c) ar[b][c] *= alpha;
        }
        mk_pb(w.data(), z.kp, eb.vp.data(), z.kk, z.ep, ar);
      }
    }
  }
  for (int64_t i = 0; i < z.n; ++i) {
    const T inv = T(1) / acc_z[i];
    const T* src = acc.data() + i * z.ep;
    T* o = out + i * z.dv;
    for (int64_t c = 0; c < z.dv; ++c) o[c] = src[c] * inv;
    lse[i] = acc_m[i] + std::log(acc_z[i]);
  }
}

template <typename T>
void backward_head(const T* q, const T* k, const T* v, const T* kt_head, const T* vt_head, const T* qr,
                   const T* sv, const int64_t* kidx,
                   const int64_t* eidx, const bool* pad, const bool* dup, const T* out, const T* lse,
                   const T* dout, T scale, T lam, const Sizes& z, T* dq, T* dk, T* dvv, T* dqr, T* dsv) {
  std::vector<T> delta(z.n);
  for (int64_t i = 0; i < z.n; ++i) {
    T acc = T(0);
    for (int64_t c = 0; c < z.dv; ++c) acc += dout[i * z.dv + c] * out[i * z.dv + c];
    delta[i] = acc;
  }
  const int64_t wp = std::max(z.mp, z.kp);
  std::vector<T> p(QB * wp), dp(QB * wp), xq(QB * z.dp), xd(QB * z.ep), dqb(QB * z.dp);
  std::vector<int64_t> rows(QB);
  if (z.shared) {
    std::vector<T> svt(z.dv * z.mp, T(0)), dsa(z.m * z.ep, T(0));  // A transposed [dv][Mp]; dA padded
    for (int64_t j = 0; j < z.m; ++j)
      for (int64_t c = 0; c < z.dv; ++c) svt[c * z.mp + j] = sv[j * z.dv + c];
    for (int64_t i0 = 0; i0 < z.n; i0 += QB) {
      const int64_t nb = std::min(QB, z.n - i0);
      for (int64_t b = 0; b < QB; ++b) rows[b] = i0 + std::min(b, nb - 1);
      gather_rows(dout, z.dv, rows.data(), nb, z.ep, xd.data());
      std::fill(p.begin(), p.end(), T(0));
      for (int64_t b = 0; b < nb; ++b) {
        const T* row = qr + (i0 + b) * z.m;
        T* pr = p.data() + b * z.mp;
        for (int64_t j = 0; j < z.m; ++j) pr[j] = row[j] * lam - lse[i0 + b];
        exp_inplace(pr, z.m);  // columns >= m stay 0
      }
      const T* xdr[QB] = {xd.data(), xd.data() + z.ep, xd.data() + 2 * z.ep, xd.data() + 3 * z.ep};
      mk_xbt(xdr, svt.data(), z.dv, z.mp, dp.data());
      for (int64_t b = 0; b < nb; ++b) {
        const int64_t i = i0 + b;
        const T* pr = p.data() + b * z.mp;
        const T* dpr = dp.data() + b * z.mp;
        T* g = dqr + i * z.m;
        for (int64_t j = 0; j < z.m; ++j) g[j] = lam * pr[j] * (dpr[j] - delta[i]);
      }
      mk_rank(p.data(), z.mp, xd.data(), z.m, z.ep, dsa.data());
    }
    for (int64_t j = 0; j < z.m; ++j) std::memcpy(dsv + j * z.dv, dsa.data() + j * z.ep, sizeof(T) * z.dv);
  }
  if (!z.routed) return;
  std::vector<int64_t> start(z.m + 1), order(z.n * z.s);
  bucket_pairs(eidx, z, start, order);
  ExpertBuf<T> eb(z, true);
  std::vector<T> dke(z.kk * z.dp), dve(z.kk * z.ep);
  const T* xqr[QB] = {xq.data(), xq.data() + z.dp, xq.data() + 2 * z.dp, xq.data() + 3 * z.dp};
  const T* xdr[QB] = {xd.data(), xd.data() + z.ep, xd.data() + 2 * z.ep, xd.data() + 3 * z.ep};
  T* dqr_rows[QB] = {dqb.data(), dqb.data() + z.dp, dqb.data() + 2 * z.dp, dqb.data() + 3 * z.dp};
  for (int64_t e = 0; e < z.m; ++e) {
    if (start[e] == start[e + 1]) continue;
    const int64_t* ki = kidx + e * z.kk;
    eb.pack(k, v, kt_head, vt_head, ki, pad, z);
    std::fill(dke.begin(), dke.end(), T(0));
    std::fill(dve.begin(), dve.end(), T(0));
    for (int64_t t0 = start[e]; t0 < start[e + 1]; t0 += QB) {
      const int64_t nb = std::min(QB, start[e + 1] - t0);
      for (int64_t b = 0; b < nb; ++b) rows[b] = order[t0 + b] / z.s;
      gather_rows(q, z.d, rows.data(), nb, z.dp, xq.data());
      gather_rows(dout, z.dv, rows.data(), nb, z.ep, xd.data());
      mk_xbt(xqr, eb.kt.data(), z.d, z.kp, p.data());
      mk_xbt(xdr, eb.vt.data(), z.dv, z.kp, dp.data());
      for (int64_t b = 0; b < QB; ++b) {
        T* l = p.data() + b * z.kp;
        T* g = dp.data() + b * z.kp;
        if (b >= nb) {
          std::fill(l, l + z.kp, T(0));
          std::fill(g, g + z.kp, T(0));
          continue;
        }
        const int64_t pr = order[t0 + b], i = rows[b];
        for (int64_t j = 0; j < z.kp; ++j) l[j] = l[j] * scale + eb.bias[j] - lse[i];
        if (dup != nullptr)
          for (int64_t j = 0; j < z.kk; ++j)
            if (dup[pr * z.kk + j]) l[j] = neg_inf<T>();
        exp_inplace(l, z.kp);  // probabilities, exactly 0 for dropped keys
        for (int64_t j = 0; j < z.kp; ++j) g[j] = l[j] * (g[j] - delta[i]) * scale;
      }
      std::fill(dqb.begin(), dqb.end(), T(0));
      mk_pb(dp.data(), z.kp, eb.kr.data(), z.kk, z.dp, dqr_rows);
      for (int64_t b = 0; b < nb; ++b) {
        T* dqi = dq + rows[b] * z.d;
        const T* src = dqb.data() + b * z.dp;
        for (int64_t c = 0; c < z.d; ++c) dqi[c] += src[c];
      }
      mk_rank(dp.data(), z.kp, xq.data(), z.kk, z.dp, dke.data());
      mk_rank(p.data(), z.kp, xd.data(), z.kk, z.ep, dve.data());
    }
    for (int64_t j = 0; j < z.kk; ++j) {
      T* dkr = dk + ki[j] * z.d;
      const T* src = dke.data() + j * z.dp;
      for (int64_t c = 0; c < z.d; ++c) dkr[c] += src[c];
      T* dvr = dvv + ki[j] * z.dv;
      const T* srcv = dve.data() + j * z.ep;
      for (int64_t c = 0; c < z.dv; ++c) dvr[c] += srcv[c];
    }
  }
}

template <typename T>
const T* ptr_or_null(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->data_ptr<T>() : nullptr;
}

std::optional<at::Tensor> contiguous_opt(const std::optional<at::Tensor>& t) {
  if (!t.has_value()) return std::nullopt;
  return t->contiguous();
}

// Returns out [B,H,N,dv], lse [B,H,N] and expert_index [B,H,N,s] (computed here as argmax of qr when
// s = 1, i.e. when no expert_index is passed in; copied otherwise).
std::tuple<at::Tensor, at::Tensor, at::Tensor> mita_fwd(
    const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_, const at::Tensor& qr_,
    const std::optional<at::Tensor>& sv_, const at::Tensor& kidx_, const std::optional<at::Tensor>& eidx_,
    const std::optional<at::Tensor>& pad_, const std::optional<at::Tensor>& dup_, double scale,
    double landmark_scale, bool routed) {
  const at::Tensor q = q_.contiguous(), k = k_.contiguous(), v = v_.contiguous(), qr = qr_.contiguous();
  const at::Tensor kidx = kidx_.contiguous();
  const auto sv = contiguous_opt(sv_), eidx_in = contiguous_opt(eidx_), pad = contiguous_opt(pad_),
             dup = contiguous_opt(dup_);
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "mita_cpu: q, k, v must be 4-D");
  TORCH_CHECK(k.size(2) < (int64_t(1) << 31), "mita_cpu: N_kv must be < 2^31");
  const int64_t b = q.size(0), h = q.size(1), hkv = k.size(1), n = q.size(2);
  const int64_t s = eidx_in ? eidx_in->size(3) : 1;
  // K^T per kv head, once per call (ATen's blocked copy), so experts gather contiguous rows of it.
  const at::Tensor kt = k.transpose(2, 3).contiguous();
  at::Tensor out = at::empty({b, h, n, v.size(3)}, q.options());
  at::Tensor lse = at::empty({b, h, n}, q.options());
  // Computed here for s = 1; with s > 1 the caller's top-s routing is used and an empty tensor returned.
  at::Tensor eidx = at::empty({eidx_in ? 0 : b, h, n, 1}, kidx.options());
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "mita_cpu_fwd", [&] {
    const Sizes z = make_sizes<scalar_t>(n, k.size(2), q.size(3), v.size(3), kidx.size(2), kidx.size(3), s,
                                         h / hkv, h, sv.has_value(), routed);
    const scalar_t* sv_p = ptr_or_null<scalar_t>(sv);
    const bool* pad_p = ptr_or_null<bool>(pad);
    const bool* dup_p = ptr_or_null<bool>(dup);
    at::parallel_for(0, b * h, 1, [&](int64_t begin, int64_t end) {
      for (int64_t bh = begin; bh < end; ++bh) {
        const int64_t bi = bh / h, kvh = bi * hkv + (bh % h) / z.group;
        forward_head<scalar_t>(
            q.data_ptr<scalar_t>() + bh * n * z.d, k.data_ptr<scalar_t>() + kvh * z.nk * z.d,
            v.data_ptr<scalar_t>() + kvh * z.nk * z.dv, kt.data_ptr<scalar_t>() + kvh * z.nk * z.d,
            qr.data_ptr<scalar_t>() + bh * n * z.m,
            sv_p ? sv_p + bh * z.m * z.dv : nullptr, kidx.data_ptr<int64_t>() + bh * z.m * z.kk,
            eidx_in ? eidx_in->data_ptr<int64_t>() + bh * n * s : nullptr, pad_p ? pad_p + bi * z.nk : nullptr,
            dup_p ? dup_p + bh * n * s * z.kk : nullptr, static_cast<scalar_t>(scale),
            static_cast<scalar_t>(landmark_scale), z, out.data_ptr<scalar_t>() + bh * n * z.dv,
            lse.data_ptr<scalar_t>() + bh * n, eidx_in ? nullptr : eidx.data_ptr<int64_t>() + bh * n);
      }
    });
  });
  return {out, lse, eidx};
}

// Gradients of q (routed part only), of k and v per *query* head [B, H, N_kv, .], of qr (the shared
// logits' part) and of the shared values. The caller sums dk/dv over each GQA group.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> mita_bwd(
    const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_, const at::Tensor& qr_,
    const std::optional<at::Tensor>& sv_, const at::Tensor& kidx_, const at::Tensor& eidx_,
    const std::optional<at::Tensor>& pad_, const std::optional<at::Tensor>& dup_, const at::Tensor& out_,
    const at::Tensor& lse_, const at::Tensor& dout_, double scale, double landmark_scale, bool routed) {
  const at::Tensor q = q_.contiguous(), k = k_.contiguous(), v = v_.contiguous(), qr = qr_.contiguous();
  const at::Tensor kidx = kidx_.contiguous(), eidx = eidx_.contiguous();
  const at::Tensor out = out_.contiguous(), lse = lse_.contiguous(), dout = dout_.contiguous();
  const auto sv = contiguous_opt(sv_), pad = contiguous_opt(pad_), dup = contiguous_opt(dup_);
  const int64_t b = q.size(0), h = q.size(1), hkv = k.size(1), n = q.size(2), nk = k.size(2);
  const at::Tensor kt = k.transpose(2, 3).contiguous(), vt = v.transpose(2, 3).contiguous();
  at::Tensor dq = at::zeros_like(q);
  at::Tensor dk = at::zeros({b, h, nk, k.size(3)}, q.options());
  at::Tensor dv = at::zeros({b, h, nk, v.size(3)}, q.options());
  at::Tensor dqr = at::zeros_like(qr);
  at::Tensor dsv = sv ? at::zeros_like(*sv) : at::empty({0}, q.options());
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "mita_cpu_bwd", [&] {
    const Sizes z = make_sizes<scalar_t>(n, nk, q.size(3), v.size(3), kidx.size(2), kidx.size(3),
                                         eidx.size(3), h / hkv, h, sv.has_value(), routed);
    const scalar_t* sv_p = ptr_or_null<scalar_t>(sv);
    const bool* pad_p = ptr_or_null<bool>(pad);
    const bool* dup_p = ptr_or_null<bool>(dup);
    at::parallel_for(0, b * h, 1, [&](int64_t begin, int64_t end) {
      for (int64_t bh = begin; bh < end; ++bh) {
        const int64_t bi = bh / h, kvh = bi * hkv + (bh % h) / z.group;
        backward_head<scalar_t>(
            q.data_ptr<scalar_t>() + bh * n * z.d, k.data_ptr<scalar_t>() + kvh * nk * z.d,
            v.data_ptr<scalar_t>() + kvh * nk * z.dv, kt.data_ptr<scalar_t>() + kvh * nk * z.d,
            vt.data_ptr<scalar_t>() + kvh * nk * z.dv, qr.data_ptr<scalar_t>() + bh * n * z.m,
            sv_p ? sv_p + bh * z.m * z.dv : nullptr, kidx.data_ptr<int64_t>() + bh * z.m * z.kk,
            eidx.data_ptr<int64_t>() + bh * n * z.s, pad_p ? pad_p + bi * nk : nullptr,
            dup_p ? dup_p + bh * n * z.s * z.kk : nullptr, out.data_ptr<scalar_t>() + bh * n * z.dv,
            lse.data_ptr<scalar_t>() + bh * n, dout.data_ptr<scalar_t>() + bh * n * z.dv,
            static_cast<scalar_t>(scale), static_cast<scalar_t>(landmark_scale), z,
            dq.data_ptr<scalar_t>() + bh * n * z.d, dk.data_ptr<scalar_t>() + bh * nk * z.d,
            dv.data_ptr<scalar_t>() + bh * nk * z.dv, dqr.data_ptr<scalar_t>() + bh * n * z.m,
            sv ? dsv.data_ptr<scalar_t>() + bh * z.m * z.dv : nullptr);
      }
    });
  });
  return {dq, dk, dv, dqr, dsv};
}

// Order-preserving unsigned keys: larger score -> larger key (IEEE bits with the sign folded).
inline uint32_t sort_key(float x) {
  const uint32_t b = __builtin_bit_cast(uint32_t, x);
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}
inline uint64_t sort_key(double x) {
  const uint64_t b = __builtin_bit_cast(uint64_t, x);
  return (b & 0x8000000000000000ull) ? ~b : (b | 0x8000000000000000ull);
}

template <typename K>
inline int64_t count_at_least(const K* __restrict keys, int64_t n, K t) {
  int64_t c = 0;
  for (int64_t i = 0; i < n; ++i) c += keys[i] >= t;  // vectorised compare-and-count
  return c;
}

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
    for (int64_t t = 0; t < n; ++t)
      if (keys[t] >= thr) dst[o++] = t;
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

at::Tensor mita_topk(const at::Tensor& scores_, int64_t k) {
  const at::Tensor scores = scores_.contiguous();
  const int64_t n = scores.size(-1), rows = scores.numel() / n;
  TORCH_CHECK(k >= 1 && k <= n, "mita_cpu.topk: k must be in 1..N");
  std::vector<int64_t> shape(scores.sizes().begin(), scores.sizes().end());
  shape.back() = k;
  at::Tensor idx = at::empty(shape, scores.options().dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES(scores.scalar_type(), "mita_cpu_topk", [&] {
    const scalar_t* src = scores.data_ptr<scalar_t>();
    int64_t* dst = idx.data_ptr<int64_t>();
    at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
      std::vector<decltype(sort_key(scalar_t()))> keys(n);
      for (int64_t r = begin; r < end; ++r) topk_row(src + r * n, n, k, dst + r * k, keys);
    });
  });
  return idx;
}

}  // namespace

TORCH_LIBRARY(mita_cpu, m) {
  m.def(
      "fwd(Tensor q, Tensor k, Tensor v, Tensor qr, Tensor? shared_values, Tensor key_index, "
      "Tensor? expert_index, Tensor? pad, Tensor? dup, float scale, float landmark_scale, bool routed) "
      "-> (Tensor, Tensor, Tensor)");
  m.def(
      "bwd(Tensor q, Tensor k, Tensor v, Tensor qr, Tensor? shared_values, Tensor key_index, "
      "Tensor expert_index, Tensor? pad, Tensor? dup, Tensor out, Tensor lse, Tensor dout, float scale, "
      "float landmark_scale, bool routed) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("topk(Tensor scores, int k) -> Tensor");
}

TORCH_LIBRARY_IMPL(mita_cpu, CPU, m) {
  m.impl("fwd", &mita_fwd);
  m.impl("bwd", &mita_bwd);
  m.impl("topk", &mita_topk);
}
