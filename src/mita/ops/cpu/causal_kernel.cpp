// Fused CPU kernel of causal MiTA with the "frozen" landmark horizon (SPEC §5).
//
// Per (batch, query head), with autograd glue in causal.py:
//   landmark_fwd: each landmark's visible scores c r_j . k_t, t < (j+1) b, computed once (mask before
//                selection) for its top-k keys (fewer visible keys than k leave the remaining slots -1)
//                and its shared value A_j = softmax_t(.) v_t; landmark_bwd: A's gradients, key block by
//                key block.
//   fwd: each query's online softmax opens with its visible shared logits lambda q.r_j, j < beta(i),
//        computed here (routing by argmax on the way when s = 1; no N x n_l tensor), then its own block causally (beta b <= t <= i, the
//        block's keys packed once and shared by its queries), then, expert by expert, the expert's k
//        keys packed once into a small buffer that stays in cache while the queries routed to it fold
//        their k logits in. Frozen keys of expert j all lie before (j+1) b <= beta(i) b, so no per-query
//        mask is needed beyond the unfilled slots.
//   bwd: recomputes logits and probabilities from the saved log-sum-exp (own block, routed experts, then
//        the shared logits); the landmarks' gradient (through the shared logits), the own block's and each
//        expert's dK/dV accumulate in local buffers added to the head's rows once, no scatter.
//   The straight-through router gate (bwd's router_gate; the forward is unchanged): each (query i, expert
//   e_r) pair's routed logits are credited as if log pi_i(e_r) had been added to them, pi_i = softmax_j
//   (lambda q_i . r_j) over the visible landmarks. The pair's summed logit gradient dl_ir comes from the
//   routed probabilities the backward computes anyway, and its chain rule through log pi joins the shared
//   logits' gradient (the same q . r_j, the same products into dq and d landmarks): no extra pass.
// Every query's logits, softmax and output are computed on its row alone (row-wise micro-kernels, a
// fixed order of parts), so a query's result does not depend on later tokens or on its tile-mates, and
// results do not depend on the thread count (work is split over (batch, head), one thread per item).
// GQA heads write their own dK/dV rows (summed over the group by the caller).

#include "kernel_common.h"

namespace {

using namespace mita_kernels;

struct CSizes {
  int64_t n, d, dv, nl, kk, s, bs, nq;
  bool shared, routed;
  int64_t dp, ep, kp, mp, bp;  // padded d, dv, k, n_l, b
};

template <typename T>
CSizes make_csizes(int64_t n, int64_t d, int64_t dv, int64_t nl, int64_t kk, int64_t s, int64_t bs, bool shared,
                   bool routed) {
  const int64_t L = VT<T>::L;
  return CSizes{n, d, dv, nl, kk, s, bs, (n + bs - 1) / bs, shared, routed,
                round_up(d, L), round_up(dv, L), round_up(kk, L), round_up(nl, L), round_up(bs, L)};
}

// Sizes of kernel_common's ExpertBuf (n_kv = n: causal self-attention).
template <typename T>
Sizes expert_sizes(const CSizes& c) {
  return make_sizes<T>(c.n, c.n, c.d, c.dv, c.nl, c.kk, c.s, 1, 1, c.shared, c.routed);
}

// The own block's keys: transposed [d][bp], rows [bp][dp] (backward), values [bp][ep], values transposed
// [dv][bp] (backward), zero padded.
template <typename T>
struct BlockBuf {
  std::vector<T> kt, kr, vp, vt;
  BlockBuf(const CSizes& z, bool backward)
      : kt(z.d * z.bp, T(0)), kr(backward ? z.bp * z.dp : 0, T(0)), vp(z.bp * z.ep, T(0)),
        vt(backward ? z.dv * z.bp : 0, T(0)) {}
  // From the rows of k and v (a b x d transpose per block: no head-wide transposed copy).
  void pack(const T* k, const T* v, int64_t t0, int64_t len, const CSizes& z) {
    std::fill(kt.begin(), kt.end(), T(0));
    transpose_rows(k + t0 * z.d, len, z.d, z.d, kt.data(), z.bp);
    for (int64_t j = 0; j < z.bp; ++j) {
      T* dst = vp.data() + j * z.ep;
      if (j < len) {
        std::memcpy(dst, v + (t0 + j) * z.dv, sizeof(T) * z.dv);
      } else {
        std::fill(dst, dst + z.dv, T(0));
      }
    }
    if (kr.empty()) return;
    for (int64_t j = 0; j < z.bp; ++j) {
      T* dst = kr.data() + j * z.dp;
      if (j < len) {
        std::memcpy(dst, k + (t0 + j) * z.d, sizeof(T) * z.d);
      } else {
        std::fill(dst, dst + z.d, T(0));
      }
    }
    std::fill(vt.begin(), vt.end(), T(0));
    transpose_rows(v + t0 * z.dv, len, z.dv, z.dv, vt.data(), z.bp);
  }
};

// Landmarks transposed and padded: [d][mp] (zeros beyond n_l).
template <typename T>
std::vector<T> landmarks_t(const T* r, const CSizes& z) {
  std::vector<T> rt(z.d * z.mp, T(0));
  transpose_rows(r, z.nl, z.d, z.d, rt.data(), z.mp);
  return rt;
}

template <typename T>
void forward_head(const HeadIn<T>& x, const HeadOut<T>& o, T scale, T lam, const CSizes& z) {
  const T *q = x.q, *k = x.k, *v = x.v, *r = x.r, *sv = x.sv;
  const int64_t *kidx = x.kidx, *eidx_in = x.eidx;
  T *out = o.out, *lse = o.lse;
  int64_t* eidx_out = o.eidx;
  const int64_t wp = std::max({z.mp, z.kp, z.bp, VT<T>::L});
  std::vector<T> acc(z.n * z.ep, T(0)), acc_m(z.n, neg_inf<T>()), acc_z(z.n, T(0));
  std::vector<T> w(QB * wp), zero_row(z.dp, T(0)), junk(z.ep);
  const T* xr[QB];
  T* ar[QB];
  // Shared values padded [n_l][ep].
  std::vector<T> ap(z.shared ? z.nl * z.ep : 0, T(0));
  for (int64_t j = 0; z.shared && j < z.nl; ++j) std::memcpy(ap.data() + j * z.ep, sv + j * z.dv, sizeof(T) * z.dv);
  if (eidx_out != nullptr)
    for (int64_t i = 0; i < std::min(z.n, z.bs); ++i) eidx_out[i] = -1;  // block 0: no landmark
  // 1. Shared logits lambda q_i . r_j of the landmarks j < beta (and s = 1 routing by their argmax).
  const std::vector<T> rt = landmarks_t(r, z);
  for (int64_t beta = 1; beta < z.nq && (z.shared || eidx_out != nullptr); ++beta) {
    const int64_t vis = std::min(beta, z.nl), jp = round_up(vis, VT<T>::L);
    const int64_t lo = beta * z.bs, hi = std::min(z.n, lo + z.bs);
    for (int64_t i0 = lo; i0 < hi; i0 += QB) {
      const int64_t nb = std::min(QB, hi - i0);
      for (int64_t b = 0; b < QB; ++b) {
        xr[b] = b < nb ? q + (i0 + b) * z.d : zero_row.data();
        ar[b] = b < nb ? acc.data() + (i0 + b) * z.ep : junk.data();
      }
      mk_xbt(xr, rt.data(), z.d, jp, w.data(), z.mp, jp);  // q . r_j
      for (int64_t b = nb; b < QB; ++b) std::fill(w.begin() + b * jp, w.begin() + (b + 1) * jp, T(0));
      for (int64_t b = 0; b < nb; ++b) {
        const int64_t i = i0 + b;
        T* wr = w.data() + b * jp;
        std::fill(wr + vis, wr + jp, neg_inf<T>());
        const int64_t best = first_argmax(wr, vis);  // visible landmarks only; NaN-safe, bounded
        const T best_score = wr[best];
        if (eidx_out != nullptr) eidx_out[i] = best;
        if (!z.shared) continue;
        const T mx = best_score * lam;  // lam > 0 and rounding is monotone: the largest shared logit
        if (mx == neg_inf<T>()) {  // every visible shared logit -inf: the part adds nothing
          std::fill(wr, wr + jp, T(0));
          continue;
        }
        for (int64_t j = 0; j < jp; ++j) wr[j] = (wr[j] - best_score) * lam;  // as kernel.cpp: no FMA error
        exp_inplace(wr, jp);  // -inf padding gives 0
        acc_m[i] = mx;
        acc_z[i] = padded_sum(wr, jp);
      }
      if (z.shared) mk_pb(w.data(), jp, ap.data(), vis, z.ep, ar);
    }
  }
  // 2. Own block, causally: query i (local r) sees local keys 0..r.
  {
    BlockBuf<T> bb(z, false);
    for (int64_t beta = 0; beta < z.nq; ++beta) {
      const int64_t t0 = beta * z.bs, len = std::min(z.bs, z.n - t0);
      bb.pack(k, v, t0, len, z);
      for (int64_t r0 = 0; r0 < len; r0 += QB) {
        const int64_t nb = std::min(QB, len - r0), jn = r0 + nb, jp = round_up(jn, VT<T>::L);
        for (int64_t b = 0; b < QB; ++b) {
          xr[b] = b < nb ? q + (t0 + r0 + b) * z.d : zero_row.data();
          ar[b] = b < nb ? acc.data() + (t0 + r0 + b) * z.ep : junk.data();
        }
        mk_xbt(xr, bb.kt.data(), z.d, jp, w.data(), z.bp, jp);
        for (int64_t b = 0; b < QB; ++b) {
          T* l = w.data() + b * jp;
          if (b >= nb) {
            std::fill(l, l + jp, T(0));
            continue;
          }
          const int64_t r = r0 + b, i = t0 + r;
          for (int64_t j = 0; j <= r; ++j) l[j] *= scale;
          std::fill(l + r + 1, l + jp, neg_inf<T>());
          online_fold(l, jp, acc_m[i], acc_z[i], ar[b], z.ep);
        }
        mk_pb(w.data(), jp, bb.vp.data(), jn, z.ep, ar);
      }
    }
  }
  // 3. Routed experts, expert by expert.
  if (z.routed && z.nl > 0) {
    const int64_t* eidx = eidx_in != nullptr ? eidx_in : eidx_out;
    const Sizes es = expert_sizes<T>(z);
    std::vector<int64_t> start(z.nl + 1), order(z.n * z.s);
    bucket_pairs(eidx, z.n * z.s, z.nl, start, order);
    ExpertBuf<T> eb(es, false);
    for (int64_t e = 0; e < z.nl; ++e) {
      if (start[e] == start[e + 1]) continue;
      eb.pack(k, v, kidx + e * z.kk, nullptr, es);
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
          const int64_t i = order[t0 + b] / z.s;
          for (int64_t j = 0; j < z.kp; ++j) l[j] = l[j] * scale + eb.bias[j];
          online_fold(l, z.kp, acc_m[i], acc_z[i], ar[b], z.ep);
        }
        mk_pb(w.data(), z.kp, eb.vp.data(), z.kk, z.ep, ar);
      }
    }
  }
  for (int64_t i = 0; i < z.n; ++i) {
    const T inv = T(1) / acc_z[i];
    const T* src = acc.data() + i * z.ep;
    T* row = out + i * o.ld;
    for (int64_t c = 0; c < z.dv; ++c) row[c] = src[c] * inv;
    lse[i] = acc_m[i] + std::log(acc_z[i]);
  }
}

// The router gate's share of the gradient of s_j = q_i . r_j (s [jp], on entry; vis visible landmarks):
// c_j = lambda (sum_{r: e_r = j} dl_r - pi_j sum_r dl_r), pi = softmax_{j < vis} (lambda s_j), over the
// query's experts e [ns] (-1: none, weight 0) and their gate gradients dl [ns]; c [jp] is 0 beyond vis.
// Experts were checked to lie below the query's block, so e_r < vis.
template <typename T>
void router_gate_grad(const T* s, int64_t vis, int64_t jp, T lam, const int64_t* e, const T* dl, int64_t ns,
                      T* c) {
  T total = T(0);
  for (int64_t r = 0; r < ns; ++r) total += e[r] >= 0 ? dl[r] : T(0);
  for (int64_t j = 0; j < vis; ++j) c[j] = s[j] * lam;
  std::fill(c + vis, c + jp, neg_inf<T>());
  const T mx = padded_max(c, jp);
  for (int64_t j = 0; j < jp; ++j) c[j] -= mx;
  exp_inplace(c, jp);  // vectorised; beyond vis: 0
  const T w = -lam * total / padded_sum(c, jp);
  for (int64_t j = 0; j < jp; ++j) c[j] *= w;
  for (int64_t r = 0; r < ns; ++r)
    if (e[r] >= 0 && e[r] < vis) c[e[r]] += lam * dl[r];
}

template <typename T>
void backward_head(const HeadIn<T>& x, const HeadGrad<T>& grads, T scale, T lam, const CSizes& z, bool gate) {
  const T *q = x.q, *k = x.k, *v = x.v, *r = x.r, *sv = x.sv;
  const T *out = grads.out, *lse = grads.lse, *dout = grads.dout;
  const int64_t *kidx = x.kidx, *eidx = x.eidx;
  T *dq = grads.dq, *dk = grads.dk, *dvv = grads.dv, *dr = grads.dr, *dsv = grads.dsv;
  std::vector<T> delta(z.n);
  for (int64_t i = 0; i < z.n; ++i) delta[i] = dot_row(dout + i * z.dv, out + i * z.dv, z.dv);
  const int64_t wp = std::max({z.mp, z.kp, z.bp, VT<T>::L});
  std::vector<T> p(QB * wp), g(QB * wp), xq(QB * z.dp), xd(QB * z.ep), dqb(QB * z.dp);
  std::vector<int64_t> rows(QB);
  const T* xqr[QB] = {xq.data(), xq.data() + z.dp, xq.data() + 2 * z.dp, xq.data() + 3 * z.dp};
  const T* xdr[QB] = {xd.data(), xd.data() + z.ep, xd.data() + 2 * z.ep, xd.data() + 3 * z.ep};
  T* dq_rows[QB] = {dqb.data(), dqb.data() + z.dp, dqb.data() + 2 * z.dp, dqb.data() + 3 * z.dp};
  // The router gate's gradient per (query, expert) pair, dl_ir = sum_t p_it (dout_i . v_t - delta_i) over
  // the pair's routed logits: filled by the routed experts (2.), spent with the shared logits (3.).
  std::vector<T> dgate(gate ? z.n * z.s : 0, T(0)), gc(gate ? wp : 0);
  // 1. Own block.
  {
    BlockBuf<T> bb(z, true);
    std::vector<T> dkb(z.bp * z.dp), dvb(z.bp * z.ep);
    for (int64_t beta = 0; beta < z.nq; ++beta) {
      const int64_t t0 = beta * z.bs, len = std::min(z.bs, z.n - t0);
      bb.pack(k, v, t0, len, z);
      std::fill(dkb.begin(), dkb.end(), T(0));
      std::fill(dvb.begin(), dvb.end(), T(0));
      for (int64_t r0 = 0; r0 < len; r0 += QB) {
        const int64_t nb = std::min(QB, len - r0), jn = r0 + nb, jp = round_up(jn, VT<T>::L);
        for (int64_t b = 0; b < QB; ++b) rows[b] = t0 + r0 + std::min(b, nb - 1);
        gather_rows(q, z.d, rows.data(), nb, z.dp, xq.data());
        gather_rows(dout, z.dv, rows.data(), nb, z.ep, xd.data());
        mk_xbt(xqr, bb.kt.data(), z.d, jp, p.data(), z.bp, jp);
        mk_xbt(xdr, bb.vt.data(), z.dv, jp, g.data(), z.bp, jp);
        for (int64_t b = 0; b < QB; ++b) {
          T* l = p.data() + b * jp;
          T* gr = g.data() + b * jp;
          if (b >= nb) {
            std::fill(l, l + jp, T(0));
            std::fill(gr, gr + jp, T(0));
            continue;
          }
          const int64_t r = r0 + b, i = t0 + r;
          for (int64_t j = 0; j <= r; ++j) l[j] = l[j] * scale - lse[i];
          std::fill(l + r + 1, l + jp, neg_inf<T>());
          exp_inplace(l, jp);
          for (int64_t j = 0; j < jp; ++j) gr[j] = l[j] * (gr[j] - delta[i]) * scale;
        }
        std::fill(dqb.begin(), dqb.end(), T(0));
        mk_pb(g.data(), jp, bb.kr.data(), jn, z.dp, dq_rows);
        for (int64_t b = 0; b < nb; ++b) add_row(dq + (t0 + r0 + b) * z.d, dqb.data() + b * z.dp, z.d);
        mk_rank(g.data(), jp, xq.data(), jn, z.dp, dkb.data());
        mk_rank(p.data(), jp, xd.data(), jn, z.ep, dvb.data());
      }
      for (int64_t j = 0; j < len; ++j) {
        add_row(dk + (t0 + j) * z.d, dkb.data() + j * z.dp, z.d);
        add_row(dvv + (t0 + j) * z.dv, dvb.data() + j * z.ep, z.dv);
      }
    }
  }
  // 2. Routed experts.
  if (z.routed && z.nl > 0) {
    const Sizes es = expert_sizes<T>(z);
    std::vector<int64_t> start(z.nl + 1), order(z.n * z.s);
    bucket_pairs(eidx, z.n * z.s, z.nl, start, order);
    ExpertBuf<T> eb(es, true);
    std::vector<T> dke(z.kk * z.dp), dve(z.kk * z.ep);
    for (int64_t e = 0; e < z.nl; ++e) {
      if (start[e] == start[e + 1]) continue;
      const int64_t* ki = kidx + e * z.kk;
      eb.pack(k, v, ki, nullptr, es);
      std::fill(dke.begin(), dke.end(), T(0));
      std::fill(dve.begin(), dve.end(), T(0));
      for (int64_t t0 = start[e]; t0 < start[e + 1]; t0 += QB) {
        const int64_t nb = std::min(QB, start[e + 1] - t0);
        for (int64_t b = 0; b < nb; ++b) rows[b] = order[t0 + b] / z.s;
        gather_rows(q, z.d, rows.data(), nb, z.dp, xq.data());
        gather_rows(dout, z.dv, rows.data(), nb, z.ep, xd.data());
        mk_xbt(xqr, eb.kt.data(), z.d, z.kp, p.data());
        mk_xbt(xdr, eb.vt.data(), z.dv, z.kp, g.data());
        for (int64_t b = 0; b < QB; ++b) {
          T* l = p.data() + b * z.kp;
          T* gr = g.data() + b * z.kp;
          if (b >= nb) {
            std::fill(l, l + z.kp, T(0));
            std::fill(gr, gr + z.kp, T(0));
            continue;
          }
          const int64_t i = rows[b];
          for (int64_t j = 0; j < z.kp; ++j) l[j] = l[j] * scale + eb.bias[j] - lse[i];
          exp_inplace(l, z.kp);  // probabilities, exactly 0 for unfilled slots
          for (int64_t j = 0; j < z.kp; ++j) gr[j] = l[j] * (gr[j] - delta[i]);
          if (gate) dgate[order[t0 + b]] = padded_sum(gr, z.kp);  // unfilled and padded slots add 0
          for (int64_t j = 0; j < z.kp; ++j) gr[j] *= scale;
        }
        std::fill(dqb.begin(), dqb.end(), T(0));
        mk_pb(g.data(), z.kp, eb.kr.data(), z.kk, z.dp, dq_rows);
        for (int64_t b = 0; b < nb; ++b) add_row(dq + rows[b] * z.d, dqb.data() + b * z.dp, z.d);
        mk_rank(g.data(), z.kp, xq.data(), z.kk, z.dp, dke.data());
        mk_rank(p.data(), z.kp, xd.data(), z.kk, z.ep, dve.data());
      }
      for (int64_t j = 0; j < z.kk; ++j) {
        if (ki[j] < 0) continue;  // unfilled slot: weight 0, nothing to add
        add_row(dk + ki[j] * z.d, dke.data() + j * z.dp, z.d);
        add_row(dvv + ki[j] * z.dv, dve.data() + j * z.ep, z.dv);
      }
    }
  }
  // 3. Shared: the logits' gradient ds_ij = lambda p_ij (dout_i . A_j - delta_i) gives dq_i += ds_ij r_j
  // and dr_j += ds_ij q_i; dA_j += p_ij dout_i. The gate adds to ds_ij (the gradient of s_ij = q_i . r_j)
  // lambda (sum_{r: e_r = j} dl_ir - pi_ij sum_r dl_ir), its chain rule through log pi_i(e_r).
  if ((z.shared || gate) && z.nl > 0) {
    std::vector<T> svt(z.shared ? z.dv * z.mp : 0, T(0)), dsa(z.shared ? z.nl * z.ep : 0, T(0));  // A^T; dA
    std::vector<T> rp(z.nl * z.dp, T(0)), dra(z.nl * z.dp, T(0));  // landmarks [n_l][Dp]; dR padded
    const std::vector<T> rt = landmarks_t(r, z);
    if (z.shared) transpose_rows(sv, z.nl, z.dv, z.dv, svt.data(), z.mp);
    for (int64_t j = 0; j < z.nl; ++j) std::memcpy(rp.data() + j * z.dp, r + j * z.d, sizeof(T) * z.d);
    for (int64_t beta = 1; beta < z.nq; ++beta) {
      const int64_t vis = std::min(beta, z.nl), jp = round_up(vis, VT<T>::L);
      const int64_t lo = beta * z.bs, hi = std::min(z.n, lo + z.bs);
      for (int64_t i0 = lo; i0 < hi; i0 += QB) {
        const int64_t nb = std::min(QB, hi - i0);
        for (int64_t b = 0; b < QB; ++b) rows[b] = i0 + std::min(b, nb - 1);
        gather_rows(q, z.d, rows.data(), nb, z.dp, xq.data());
        mk_xbt(xqr, rt.data(), z.d, jp, p.data(), z.mp, jp);  // q . r_j, as in the forward
        if (z.shared) {
          gather_rows(dout, z.dv, rows.data(), nb, z.ep, xd.data());
          mk_xbt(xdr, svt.data(), z.dv, jp, g.data(), z.mp, jp);
        }
        for (int64_t b = 0; b < QB; ++b) {
          T* pr = p.data() + b * jp;
          T* gr = g.data() + b * jp;
          if (b >= nb) {
            std::fill(pr, pr + jp, T(0));
            std::fill(gr, gr + jp, T(0));
            continue;
          }
          const int64_t i = i0 + b;
          if (gate) router_gate_grad(pr, vis, jp, lam, eidx + i * z.s, dgate.data() + i * z.s, z.s, gc.data());
          if (!z.shared) {
            std::copy(gc.begin(), gc.begin() + jp, gr);
            continue;
          }
          for (int64_t j = 0; j < vis; ++j) pr[j] = pr[j] * lam - lse[i];
          std::fill(pr + vis, pr + jp, neg_inf<T>());
          exp_inplace(pr, jp);  // columns >= vis: 0
          for (int64_t j = 0; j < jp; ++j) gr[j] = lam * pr[j] * (gr[j] - delta[i]);
          if (gate)
            for (int64_t j = 0; j < jp; ++j) gr[j] += gc[j];
        }
        std::fill(dqb.begin(), dqb.end(), T(0));
        mk_pb(g.data(), jp, rp.data(), vis, z.dp, dq_rows);
        for (int64_t b = 0; b < nb; ++b) add_row(dq + (i0 + b) * z.d, dqb.data() + b * z.dp, z.d);
        mk_rank(g.data(), jp, xq.data(), vis, z.dp, dra.data());
        if (z.shared) mk_rank(p.data(), jp, xd.data(), vis, z.ep, dsa.data());
      }
    }
    for (int64_t j = 0; j < z.nl; ++j) {
      if (z.shared) std::memcpy(dsv + j * z.dv, dsa.data() + j * z.ep, sizeof(T) * z.dv);
      std::memcpy(dr + j * z.d, dra.data() + j * z.dp, sizeof(T) * z.d);
    }
  }
}

void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& r,
                  const at::Tensor& kidx, int64_t block_size) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "mita_cpu_causal: q, k, v must be 4-D");
  TORCH_CHECK(k.size(2) == q.size(2) && v.size(2) == q.size(2), "mita_cpu_causal: q, k, v of one length");
  check_gather_offsets(k, v, "mita_cpu_causal");
  TORCH_CHECK(block_size >= 1, "mita_cpu_causal: block_size must be >= 1");
  const int64_t nl = q.size(2) / block_size;
  TORCH_CHECK(r.dim() == 4 && r.size(0) == q.size(0) && r.size(1) == q.size(1) && r.size(2) == nl &&
                  r.size(3) == q.size(3),
              "mita_cpu_causal: landmarks must be [B, H, N // b, d]");
  TORCH_CHECK(kidx.dim() == 4 && kidx.size(0) == q.size(0) && kidx.size(1) == q.size(1) && kidx.size(2) == nl,
              "mita_cpu_causal: key_index must be [B, H, N // b, k]");
  TORCH_CHECK(k.size(1) >= 1 && q.size(1) % k.size(1) == 0 && v.size(1) == k.size(1) && k.size(0) == q.size(0) &&
                  v.size(0) == q.size(0) && k.size(3) == q.size(3),
              "mita_cpu_causal: k, v must be [B, H_kv, N, d] with H a multiple of H_kv");
  check_range(kidx, -1, q.size(2), "mita_cpu_causal", "key_index");  // -1: an unfilled slot
}

// Experts [B, H, N, s]: -1 (none) or a landmark of an earlier block (a later one would break causality).
void check_experts(const at::Tensor& eidx, const at::Tensor& q, int64_t block_size, const char* op) {
  TORCH_CHECK(eidx.dim() == 4 && eidx.size(0) == q.size(0) && eidx.size(1) == q.size(1) &&
                  eidx.size(2) == q.size(2) && eidx.size(3) >= 1,
              op, ": expert_index must be [B, H, N, s]");
  check_range(eidx, -1, q.size(2) / block_size, op, "expert_index");
  const int64_t* e = eidx.data_ptr<int64_t>();
  const int64_t n = q.size(2), s = eidx.size(3);
  for (int64_t r = 0, rows = eidx.numel() / s; r < rows; ++r)
    for (int64_t x = 0; x < s; ++x)
      TORCH_CHECK(e[r * s + x] < (r % n) / block_size, op, ": expert_index names landmark ", e[r * s + x],
                  " for query ", r % n, ", whose block sees only landmarks < ", (r % n) / block_size);
}

// out [B,H,N,dv], lse [B,H,N] and, when no expert_index is passed (s = 1), the routing [B,H,N,1]
// (-1 in block 0; an empty tensor otherwise). router_gate changes only the backward (the forward takes it so
// that both passes have one argument list).
std::tuple<at::Tensor, at::Tensor, at::Tensor> causal_fwd(
    const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_, const at::Tensor& r_,
    const std::optional<at::Tensor>& sv_, const at::Tensor& kidx_, const std::optional<at::Tensor>& eidx_,
    double scale, double landmark_scale, int64_t block_size, bool routed, bool /*router_gate*/) {
  const at::Tensor q = q_.contiguous(), k = k_.contiguous(), v = v_.contiguous(), r = r_.contiguous();
  const at::Tensor kidx = kidx_.contiguous();
  const auto sv = contiguous_opt(sv_), eidx_in = contiguous_opt(eidx_);
  check_inputs(q, k, v, r, kidx, block_size);
  if (eidx_in) check_experts(*eidx_in, q, block_size, "mita_cpu_causal.fwd");
  check_shape(sv, {q.size(0), q.size(1), r.size(2), v.size(3)}, "mita_cpu_causal.fwd", "shared_values");
  const int64_t b = q.size(0), h = q.size(1), hkv = k.size(1), n = q.size(2), nl = r.size(2);
  const int64_t s = eidx_in ? eidx_in->size(3) : 1, group = h / hkv;
  at::Tensor out = at::empty({b, h, n, v.size(3)}, q.options());
  at::Tensor lse = at::empty({b, h, n}, q.options());
  at::Tensor eidx = at::empty({eidx_in ? 0 : b, h, n, 1}, kidx.options());
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "mita_cpu_causal_fwd", [&] {
    const CSizes z = make_csizes<scalar_t>(n, q.size(3), v.size(3), nl, kidx.size(3), s, block_size,
                                           sv.has_value(), routed);
    const scalar_t* sv_p = ptr_or_null<scalar_t>(sv);
    at::parallel_for(0, b * h, 1, [&](int64_t begin, int64_t end) {
      for (int64_t bh = begin; bh < end; ++bh) {
        const int64_t kvh = (bh / h) * hkv + (bh % h) / group;
        const HeadIn<scalar_t> x{q.data_ptr<scalar_t>() + bh * n * z.d, k.data_ptr<scalar_t>() + kvh * n * z.d,
                                 v.data_ptr<scalar_t>() + kvh * n * z.dv, sv_p ? sv_p + bh * nl * z.dv : nullptr,
                                 nullptr, r.data_ptr<scalar_t>() + bh * nl * z.d,
                                 kidx.data_ptr<int64_t>() + bh * nl * z.kk,
                                 eidx_in ? eidx_in->data_ptr<int64_t>() + bh * n * s : nullptr, nullptr, nullptr};
        const HeadOut<scalar_t> o{out.data_ptr<scalar_t>() + bh * n * z.dv, z.dv, lse.data_ptr<scalar_t>() + bh * n,
                                  eidx_in ? nullptr : eidx.data_ptr<int64_t>() + bh * n};
        forward_head<scalar_t>(x, o, static_cast<scalar_t>(scale), static_cast<scalar_t>(landmark_scale), z);
      }
    });
  });
  return {out, lse, eidx};
}

// dq, dk and dv per *query* head [B, H, N, .] (the caller sums each GQA group), d landmarks (through the
// shared logits and, with router_gate, the gate; their part through A is torch's) and d shared_values.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> causal_bwd(
    const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_, const at::Tensor& r_,
    const std::optional<at::Tensor>& sv_, const at::Tensor& kidx_, const at::Tensor& eidx_,
    const at::Tensor& out_, const at::Tensor& lse_, const at::Tensor& dout_, double scale,
    double landmark_scale, int64_t block_size, bool routed, bool router_gate) {
  const at::Tensor q = q_.contiguous(), k = k_.contiguous(), v = v_.contiguous(), r = r_.contiguous();
  const at::Tensor kidx = kidx_.contiguous(), eidx = eidx_.contiguous();
  const at::Tensor out = out_.contiguous(), lse = lse_.contiguous(), dout = dout_.contiguous();
  const auto sv = contiguous_opt(sv_);
  check_inputs(q, k, v, r, kidx, block_size);
  check_experts(eidx, q, block_size, "mita_cpu_causal.bwd");
  const int64_t b = q.size(0), h = q.size(1), hkv = k.size(1), n = q.size(2), nl = r.size(2);
  check_shape(sv, {b, h, nl, v.size(3)}, "mita_cpu_causal.bwd", "shared_values");
  for (const at::Tensor* t : {&out, &dout}) check_shape(*t, {b, h, n, v.size(3)}, "mita_cpu_causal.bwd", "out/dout");
  check_shape(lse, {b, h, n}, "mita_cpu_causal.bwd", "lse");
  const int64_t group = h / hkv;
  at::Tensor dq = at::zeros_like(q);
  at::Tensor dk = at::zeros({b, h, n, k.size(3)}, q.options());
  at::Tensor dv = at::zeros({b, h, n, v.size(3)}, q.options());
  at::Tensor dr = at::zeros_like(r);
  at::Tensor dsv = sv ? at::zeros_like(*sv) : at::empty({0}, q.options());
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "mita_cpu_causal_bwd", [&] {
    const CSizes z = make_csizes<scalar_t>(n, q.size(3), v.size(3), nl, kidx.size(3), eidx.size(3),
                                           block_size, sv.has_value(), routed);
    const scalar_t* sv_p = ptr_or_null<scalar_t>(sv);
    at::parallel_for(0, b * h, 1, [&](int64_t begin, int64_t end) {
      for (int64_t bh = begin; bh < end; ++bh) {
        const int64_t kvh = (bh / h) * hkv + (bh % h) / group;
        const HeadIn<scalar_t> x{q.data_ptr<scalar_t>() + bh * n * z.d, k.data_ptr<scalar_t>() + kvh * n * z.d,
                                 v.data_ptr<scalar_t>() + kvh * n * z.dv, sv_p ? sv_p + bh * nl * z.dv : nullptr,
                                 nullptr, r.data_ptr<scalar_t>() + bh * nl * z.d,
                                 kidx.data_ptr<int64_t>() + bh * nl * z.kk, eidx.data_ptr<int64_t>() + bh * n * z.s,
                                 nullptr, nullptr};
        const HeadGrad<scalar_t> g{out.data_ptr<scalar_t>() + bh * n * z.dv, lse.data_ptr<scalar_t>() + bh * n,
                                   dout.data_ptr<scalar_t>() + bh * n * z.dv, dq.data_ptr<scalar_t>() + bh * n * z.d,
                                   dk.data_ptr<scalar_t>() + bh * n * z.d, dv.data_ptr<scalar_t>() + bh * n * z.dv,
                                   nullptr, dr.data_ptr<scalar_t>() + bh * nl * z.d,
                                   sv ? dsv.data_ptr<scalar_t>() + bh * nl * z.dv : nullptr};
        backward_head<scalar_t>(x, g, static_cast<scalar_t>(scale), static_cast<scalar_t>(landmark_scale), z,
                                router_gate && routed);
      }
    });
  });
  return {dq, dk, dv, dr, dsv};
}

// ---- the landmark side: A_j = softmax_t(c r_j . k_t) v_t over t < (j+1) b, with the key sets ----

// Padded copies of one call's keys/values: K^T [B,Hkv,d,np], V [B,Hkv,np,ep] (zero beyond n_l b).
template <typename T>
std::pair<at::Tensor, at::Tensor> padded_kv(const at::Tensor& k, const at::Tensor& v, int64_t len, int64_t np,
                                            int64_t ep) {
  at::Tensor kt = at::zeros({k.size(0), k.size(1), k.size(3), np}, k.options());
  kt.narrow(3, 0, len).copy_(k.narrow(2, 0, len).transpose(2, 3));
  at::Tensor vp = at::zeros({v.size(0), v.size(1), np, ep}, v.options());
  vp.narrow(2, 0, len).narrow(3, 0, v.size(3)).copy_(v.narrow(2, 0, len));
  return {kt, vp};
}

// Forward: per (batch, head, QB landmarks) the visible scores c r_j . k_t (t < (j+1) b) once, for the
// top-k (same scaled scores as the torch backend) and the softmax. Returns A [B,H,n_l,dv], its lse
// [B,H,n_l] and the key sets [B,H,n_l,topk] (-1 beyond the visible keys; empty when topk = 0).
std::tuple<at::Tensor, at::Tensor, at::Tensor> landmark_fwd(const at::Tensor& r_, const at::Tensor& k_,
                                                            const at::Tensor& v_, double scale,
                                                            int64_t block_size, int64_t kk, bool want_values) {
  const at::Tensor r = r_.contiguous(), k = k_.contiguous(), v = v_.contiguous();
  TORCH_CHECK(r.dim() == 4 && k.dim() == 4 && v.dim() == 4 && r.size(3) == k.size(3) && r.size(0) == k.size(0),
              "mita_cpu_causal.landmark_fwd: landmarks [B, H, n_l, d], keys/values [B, H_kv, N, .]");
  TORCH_CHECK(kk >= 0 && block_size >= 1, "mita_cpu_causal.landmark_fwd: topk >= 0, block_size >= 1");
  const int64_t b = r.size(0), h = r.size(1), nl = r.size(2), d = r.size(3), hkv = k.size(1), dv = v.size(3);
  TORCH_CHECK(hkv >= 1 && h % hkv == 0 && nl * block_size <= k.size(2) && v.size(0) == k.size(0) && v.size(1) == hkv &&
                  v.size(2) == k.size(2),
              "mita_cpu_causal.landmark_fwd: bad sizes");
  at::Tensor a = at::zeros({b, h, want_values ? nl : 0, dv}, r.options());
  at::Tensor lse = at::zeros({b, h, want_values ? nl : 0}, r.options());
  at::Tensor idx = at::empty({b, h, nl, kk}, r.options().dtype(at::kLong));
  if (nl == 0) return {a, lse, idx};
  AT_DISPATCH_FLOATING_TYPES(r.scalar_type(), "mita_cpu_causal_landmark_fwd", [&] {
    using T = scalar_t;
    const int64_t L = VT<T>::L, len = nl * block_size, np = round_up(len, L), ep = round_up(dv, L);
    const int64_t groups = (nl + QB - 1) / QB;
    auto [kt, vp] = padded_kv<T>(k, v, len, np, ep);
    const T *ktp = kt.data_ptr<T>(), *vpp = vp.data_ptr<T>(), *rp = r.data_ptr<T>();
    const T c = static_cast<T>(scale);
    int64_t* dst = idx.data_ptr<int64_t>();
    T* ap = a.data_ptr<T>();
    T* lp = lse.data_ptr<T>();
    at::parallel_for(0, b * h * groups, 1, [&](int64_t begin, int64_t end) {
      std::vector<decltype(sort_key(T()))> keys(len);
      std::vector<T> sc(QB * np), zero_row(d, T(0)), acc(QB * ep);
      const T* xr[QB];
      T* ar[QB];
      for (int64_t item = begin; item < end; ++item) {
        const int64_t bh = item / groups, j0 = (item % groups) * QB, nb = std::min(QB, nl - j0);
        const int64_t kvh = (bh / h) * hkv + (bh % h) / (h / hkv);
        const int64_t jn = (j0 + nb) * block_size, jp = round_up(jn, L);
        for (int64_t q = 0; q < QB; ++q) {
          xr[q] = q < nb ? rp + (bh * nl + j0 + q) * d : zero_row.data();
          ar[q] = acc.data() + q * ep;
        }
        mk_xbt(xr, ktp + kvh * d * np, d, jp, sc.data(), np, jp);
        std::fill(acc.begin(), acc.end(), T(0));
        T zsum[QB] = {}, mx[QB] = {};
        for (int64_t q = 0; q < QB; ++q) {
          T* l = sc.data() + q * jp;
          if (q >= nb) {
            std::fill(l, l + jp, T(0));
            continue;
          }
          const int64_t j = j0 + q, vis = (j + 1) * block_size;
          for (int64_t t = 0; t < vis; ++t) l[t] *= c;
          std::fill(l + vis, l + jp, neg_inf<T>());  // mask before selection
          if (kk > 0) {
            int64_t* o = dst + (bh * nl + j) * kk;
            if (vis <= kk) {
              for (int64_t t = 0; t < kk; ++t) o[t] = t < vis ? t : -1;
            } else {
              topk_row(l, vis, kk, o, keys);
            }
          }
          if (!want_values) continue;
          mx[q] = padded_max(l, jp);
          for (int64_t t = 0; t < jp; ++t) l[t] -= mx[q];
          exp_inplace(l, jp);
          zsum[q] = padded_sum(l, jp);
        }
        if (!want_values) continue;
        mk_pb(sc.data(), jp, vpp + kvh * np * ep, jn, ep, ar);
        for (int64_t q = 0; q < nb; ++q) {
          const int64_t row = bh * nl + j0 + q;
          const T inv = T(1) / zsum[q];
          for (int64_t e = 0; e < dv; ++e) ap[row * dv + e] = acc[q * ep + e] * inv;
          lp[row] = mx[q] + std::log(zsum[q]);
        }
      }
    });
  });
  return {a, lse, idx};
}

// Backward of A, key block by key block (key block c is seen whole by the landmarks j >= c): dK/dV of a
// block accumulate locally, dR in a small per-head buffer. dK, dV per *query* head [B,H,N,.] (the caller
// sums each GQA group); dR [B,H,n_l,d].
std::tuple<at::Tensor, at::Tensor, at::Tensor> landmark_bwd(const at::Tensor& r_, const at::Tensor& k_,
                                                            const at::Tensor& v_, const at::Tensor& a_,
                                                            const at::Tensor& lse_, const at::Tensor& da_,
                                                            double scale, int64_t block_size) {
  const at::Tensor r = r_.contiguous(), k = k_.contiguous(), v = v_.contiguous(), a = a_.contiguous();
  const at::Tensor lse = lse_.contiguous(), da = da_.contiguous();
  const int64_t b = r.size(0), h = r.size(1), nl = r.size(2), d = r.size(3), hkv = k.size(1), n = k.size(2);
  const int64_t dv = v.size(3), group = h / hkv;
  const char* op = "mita_cpu_causal.landmark_bwd";
  TORCH_CHECK(k.dim() == 4 && v.dim() == 4 && k.size(0) == b && v.size(0) == b && hkv >= 1 && h % hkv == 0 &&
                  v.size(1) == hkv && v.size(2) == n && k.size(3) == d && block_size >= 1 && nl * block_size <= n,
              op, ": bad sizes");
  check_shape(a, {b, h, nl, dv}, op, "shared_values");
  check_shape(da, {b, h, nl, dv}, op, "d shared_values");
  check_shape(lse, {b, h, nl}, op, "lse");
  at::Tensor dr = at::zeros_like(r);
  at::Tensor dk = at::zeros({b, h, n, d}, r.options());
  at::Tensor dvv = at::zeros({b, h, n, dv}, r.options());
  if (nl == 0) return {dr, dk, dvv};
  AT_DISPATCH_FLOATING_TYPES(r.scalar_type(), "mita_cpu_causal_landmark_bwd", [&] {
    using T = scalar_t;
    const int64_t L = VT<T>::L, bs = block_size, bp = round_up(bs, L), dp = round_up(d, L), ep = round_up(dv, L);
    const T c = static_cast<T>(scale);
    at::parallel_for(0, b * h, 1, [&](int64_t begin, int64_t end) {
      std::vector<T> rpad((nl + QB) * dp, T(0)), dapad((nl + QB) * ep, T(0)), dra(nl * dp, T(0)), delta(nl);
      std::vector<T> ktb(d * bp, T(0)), kb(bp * dp, T(0)), vtb(dv * bp, T(0));
      std::vector<T> p(QB * bp), g(QB * bp), dkb(bp * dp), dvb(bp * ep), junk(dp);
      for (int64_t bh = begin; bh < end; ++bh) {
        const int64_t kvh = (bh / h) * hkv + (bh % h) / group;
        const T* rh = r.data_ptr<T>() + bh * nl * d;
        const T* ah = a.data_ptr<T>() + bh * nl * dv;
        const T* dah = da.data_ptr<T>() + bh * nl * dv;
        const T* lh = lse.data_ptr<T>() + bh * nl;
        const T* kh = k.data_ptr<T>() + kvh * n * d;
        const T* vh = v.data_ptr<T>() + kvh * n * dv;
        std::fill(dra.begin(), dra.end(), T(0));
        for (int64_t j = 0; j < nl; ++j) {
          std::memcpy(rpad.data() + j * dp, rh + j * d, sizeof(T) * d);
          std::memcpy(dapad.data() + j * ep, dah + j * dv, sizeof(T) * dv);
          T s = T(0);
          for (int64_t e = 0; e < dv; ++e) s += dah[j * dv + e] * ah[j * dv + e];
          delta[j] = s;
        }
        for (int64_t cb = 0; cb < nl; ++cb) {
          const int64_t t0 = cb * bs;
          for (int64_t t = 0; t < bs; ++t) {
            std::memcpy(kb.data() + t * dp, kh + (t0 + t) * d, sizeof(T) * d);
            for (int64_t e = 0; e < d; ++e) ktb[e * bp + t] = kh[(t0 + t) * d + e];
            for (int64_t e = 0; e < dv; ++e) vtb[e * bp + t] = vh[(t0 + t) * dv + e];
          }
          std::fill(dkb.begin(), dkb.end(), T(0));
          std::fill(dvb.begin(), dvb.end(), T(0));
          for (int64_t j0 = cb; j0 < nl; j0 += QB) {
            const int64_t nb = std::min(QB, nl - j0);
            const T* xr[QB] = {rpad.data() + j0 * dp, rpad.data() + (j0 + 1) * dp, rpad.data() + (j0 + 2) * dp,
                               rpad.data() + (j0 + 3) * dp};
            const T* xd[QB] = {dapad.data() + j0 * ep, dapad.data() + (j0 + 1) * ep,
                               dapad.data() + (j0 + 2) * ep, dapad.data() + (j0 + 3) * ep};
            mk_xbt(xr, ktb.data(), d, bp, p.data(), bp, bp);
            mk_xbt(xd, vtb.data(), dv, bp, g.data(), bp, bp);
            for (int64_t q = 0; q < QB; ++q) {
              T* l = p.data() + q * bp;
              T* gr = g.data() + q * bp;
              if (q >= nb) {
                std::fill(l, l + bp, T(0));
                std::fill(gr, gr + bp, T(0));
                continue;
              }
              const int64_t j = j0 + q;
              for (int64_t t = 0; t < bs; ++t) l[t] = l[t] * c - lh[j];
              std::fill(l + bs, l + bp, neg_inf<T>());
              exp_inplace(l, bp);
              for (int64_t t = 0; t < bp; ++t) gr[t] = l[t] * (gr[t] - delta[j]) * c;
            }
            T* drr[QB];
            for (int64_t q = 0; q < QB; ++q) drr[q] = q < nb ? dra.data() + (j0 + q) * dp : junk.data();
            mk_pb(g.data(), bp, kb.data(), bs, dp, drr);
            mk_rank(g.data(), bp, rpad.data() + j0 * dp, bs, dp, dkb.data());
            mk_rank(p.data(), bp, dapad.data() + j0 * ep, bs, ep, dvb.data());
          }
          T* dkh = dk.data_ptr<T>() + (bh * n + t0) * d;
          T* dvh = dvv.data_ptr<T>() + (bh * n + t0) * dv;
          for (int64_t t = 0; t < bs; ++t) {
            std::memcpy(dkh + t * d, dkb.data() + t * dp, sizeof(T) * d);
            std::memcpy(dvh + t * dv, dvb.data() + t * ep, sizeof(T) * dv);
          }
        }
        T* drh = dr.data_ptr<T>() + bh * nl * d;
        for (int64_t j = 0; j < nl; ++j) std::memcpy(drh + j * d, dra.data() + j * dp, sizeof(T) * d);
      }
    });
  });
  return {dr, dk, dvv};
}

}  // namespace

TORCH_LIBRARY(mita_cpu_causal, m) {
  m.def(
      "fwd(Tensor q, Tensor k, Tensor v, Tensor landmarks, Tensor? shared_values, Tensor key_index, "
      "Tensor? expert_index, float scale, float landmark_scale, int block_size, bool routed, "
      "bool router_gate=False) -> (Tensor, Tensor, Tensor)");
  m.def(
      "bwd(Tensor q, Tensor k, Tensor v, Tensor landmarks, Tensor? shared_values, Tensor key_index, "
      "Tensor expert_index, Tensor out, Tensor lse, Tensor dout, float scale, float landmark_scale, "
      "int block_size, bool routed, bool router_gate=False) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "landmark_fwd(Tensor landmarks, Tensor k, Tensor v, float scale, int block_size, int topk, "
      "bool values) -> (Tensor, Tensor, Tensor)");
  m.def(
      "landmark_bwd(Tensor landmarks, Tensor k, Tensor v, Tensor values, Tensor lse, Tensor dvalues, "
      "float scale, int block_size) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(mita_cpu_causal, CPU, m) {
  m.impl("fwd", &causal_fwd);
  m.impl("bwd", &causal_bwd);
  m.impl("landmark_fwd", &landmark_fwd);
  m.impl("landmark_bwd", &landmark_bwd);
}
