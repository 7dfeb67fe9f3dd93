// Fused CPU kernels of MiTA (SPEC §2), two paths (ops/cpu_backend.py picks one per call):
//   whole-op (whole_fwd / whole_bwd): per (batch, head) the landmark side too, R K^T, each landmark's top-k,
//             the shared values A = softmax(R K^T) V and Q R^T (LandmarkHead), then the attention step;
//             the backward recomputes the landmark probabilities P (Q R^T and A are saved).
//   split     (split_fwd / split_bwd, topk): torch computes the landmark side; these kernels choose the
//             top-k keys and do the attention step.
// The attention step, shared by both (forward_head / backward_head, one HeadIn/HeadOut/HeadGrad per head):
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
// (summed over the group by the caller), so no two threads write the same memory. Every tensor handed in
// is checked for shape and index range before its data is read.

#include "kernel_common.h"

namespace {

using namespace mita_kernels;

template <typename T>
void forward_head(const HeadIn<T>& x, const HeadOut<T>& o, T scale, T lam, const Sizes& z) {
  const T *q = x.q, *k = x.k, *v = x.v, *qr = x.qr, *sv = x.sv;
  const int64_t *kidx = x.kidx, *eidx_in = x.eidx;
  const bool *pad = x.pad, *dup = x.dup;
  T *out = o.out, *lse = o.lse;
  int64_t* eidx_out = o.eidx;
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
      const int64_t best = first_argmax(row, z.m);  // NaN-safe, bounded; as torch.argmax
      const T best_score = row[best];
      if (eidx_out != nullptr) eidx_out[i] = best;
      if (!z.shared) {
        acc_m[i] = neg_inf<T>();
        acc_z[i] = T(0);
        continue;
      }
      const T mx = best_score * lam;  // rounding is monotone, so this is the largest shared logit
      if (mx == neg_inf<T>()) {  // every shared logit -inf: the part adds nothing (no -inf - -inf)
        std::fill(wr, wr + z.mp, T(0));
        acc_m[i] = neg_inf<T>();
        acc_z[i] = T(0);
        continue;
      }
      // (l - best) * lam, not l * lam - mx: a fused multiply-add would leave the rounding error of mx,
      // e^(ulp(mx) / 2), in every weight, and that overflows for large lam (landmark_scale=1e9 in float32).
      for (int64_t j = 0; j < z.mp; ++j) wr[j] = (wr[j] - best_score) * lam;
      exp_inplace(wr, z.mp);
      acc_m[i] = mx;
      acc_z[i] = padded_sum(wr, z.mp);
    }
    if (z.shared) mk_pb(w.data(), z.mp, ap.data(), z.m, z.ep, ar);
  }
  if (z.routed) {
    const int64_t* eidx = eidx_in != nullptr ? eidx_in : eidx_out;
    std::vector<int64_t> start(z.m + 1), order(z.n * z.s);
    bucket_pairs(eidx, z.n * z.s, z.m, start, order);
    ExpertBuf<T> eb(z, false);
    for (int64_t e = 0; e < z.m; ++e) {
      if (start[e] == start[e + 1]) continue;
      eb.pack(k, v, kidx + e * z.kk, pad, z);
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
          online_fold(l, z.kp, acc_m[i], acc_z[i], ar[b], z.ep);  // all dropped: l zeroed, nothing added
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

template <typename T>
void backward_head(const HeadIn<T>& x, const HeadGrad<T>& gr, T scale, T lam, const Sizes& z) {
  const T *q = x.q, *k = x.k, *v = x.v, *qr = x.qr, *sv = x.sv, *out = gr.out, *lse = gr.lse, *dout = gr.dout;
  const int64_t *kidx = x.kidx, *eidx = x.eidx;
  const bool *pad = x.pad, *dup = x.dup;
  T *dq = gr.dq, *dk = gr.dk, *dvv = gr.dv, *dqr = gr.dqr, *dsv = gr.dsv;
  std::vector<T> delta(z.n);
  for (int64_t i = 0; i < z.n; ++i) delta[i] = dot_row(dout + i * z.dv, out + i * z.dv, z.dv);
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
  bucket_pairs(eidx, z.n * z.s, z.m, start, order);
  ExpertBuf<T> eb(z, true);
  std::vector<T> dke(z.kk * z.dp), dve(z.kk * z.ep);
  // One expert's probabilities, their gradients, queries and output gradients, all its queries at once
  // (rows past the last query stay zero), so dK and dV take one rank update per expert.
  int64_t most = 0;
  for (int64_t e = 0; e < z.m; ++e) most = std::max(most, start[e + 1] - start[e]);
  most = round_up(most, QB);
  std::vector<T> pa(most * z.kp), ga(most * z.kp), xqa(most * z.dp), xda(most * z.ep);
  T* dqr_rows[QB] = {dqb.data(), dqb.data() + z.dp, dqb.data() + 2 * z.dp, dqb.data() + 3 * z.dp};
  for (int64_t e = 0; e < z.m; ++e) {
    if (start[e] == start[e + 1]) continue;
    const int64_t* ki = kidx + e * z.kk;
    const int64_t ne = start[e + 1] - start[e];
    eb.pack(k, v, ki, pad, z);
    std::fill(dke.begin(), dke.end(), T(0));
    std::fill(dve.begin(), dve.end(), T(0));
    for (int64_t t0 = start[e]; t0 < start[e + 1]; t0 += QB) {
      const int64_t nb = std::min(QB, start[e + 1] - t0), at = t0 - start[e];
      T *pb = pa.data() + at * z.kp, *gb = ga.data() + at * z.kp;
      T *xqb = xqa.data() + at * z.dp, *xdb = xda.data() + at * z.ep;
      for (int64_t b = 0; b < nb; ++b) rows[b] = order[t0 + b] / z.s;
      gather_rows(q, z.d, rows.data(), nb, z.dp, xqb);
      gather_rows(dout, z.dv, rows.data(), nb, z.ep, xdb);
      const T* xqr[QB] = {xqb, xqb + z.dp, xqb + 2 * z.dp, xqb + 3 * z.dp};
      const T* xdr[QB] = {xdb, xdb + z.ep, xdb + 2 * z.ep, xdb + 3 * z.ep};
      mk_xbt(xqr, eb.kt.data(), z.d, z.kp, pb);
      mk_xbt(xdr, eb.vt.data(), z.dv, z.kp, gb);
      for (int64_t b = 0; b < QB; ++b) {
        T* l = pb + b * z.kp;
        T* g = gb + b * z.kp;
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
      mk_pb(gb, z.kp, eb.kr.data(), z.kk, z.dp, dqr_rows);
      for (int64_t b = 0; b < nb; ++b) {
        add_row(dq + rows[b] * z.d, dqb.data() + b * z.dp, z.d);
      }
    }
    mk_rank_n(ga.data(), z.kp, xqa.data(), z.dp, ne, z.kk, z.dp, dke.data());
    mk_rank_n(pa.data(), z.kp, xda.data(), z.ep, ne, z.kk, z.ep, dve.data());
    for (int64_t j = 0; j < z.kk; ++j) {
      add_row(dk + ki[j] * z.d, dke.data() + j * z.dp, z.d);
      add_row(dvv + ki[j] * z.dv, dve.data() + j * z.ep, z.dv);
    }
  }
}

// The split path's inputs: shapes, and key/expert indices in range (they address k, v and the experts).
void check_split_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& qr,
                        const std::optional<at::Tensor>& sv, const at::Tensor& kidx,
                        const std::optional<at::Tensor>& eidx, const std::optional<at::Tensor>& pad,
                        const std::optional<at::Tensor>& dup, const char* op) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4 && kidx.dim() == 4, op, ": q, k, v, key_index 4-D");
  check_gather_offsets(k, v, op);
  const int64_t b = q.size(0), h = q.size(1), n = q.size(2), nk = k.size(2), m = kidx.size(2);
  const int64_t s = eidx ? eidx->size(3) : 1;
  TORCH_CHECK(k.size(0) == b && v.size(0) == b && k.size(1) >= 1 && h % k.size(1) == 0 && v.size(1) == k.size(1) &&
                  v.size(2) == nk && k.size(3) == q.size(3),
              op, ": k, v must be [B, H_kv, N_kv, d] with H % H_kv == 0");
  check_shape(qr, {b, h, n, m}, op, "qr");
  check_shape(sv, {b, h, m, v.size(3)}, op, "shared_values");
  TORCH_CHECK(kidx.size(0) == b && kidx.size(1) == h && kidx.size(3) >= 1 && kidx.size(3) <= nk, op,
              ": key_index must be [B, H, m, k] with 1 <= k <= N_kv");
  check_range(kidx, 0, nk, op, "key_index");
  if (eidx) {
    check_shape(*eidx, {b, h, n, s}, op, "expert_index");
    check_range(*eidx, 0, m, op, "expert_index");
  }
  check_mask(pad, {b, nk}, op, "pad");
  check_mask(dup, {b, h, n, s, kidx.size(3)}, op, "dup");
}

// Returns out [B,H,N,dv], lse [B,H,N] and expert_index [B,H,N,s] (computed here as argmax of qr when
// s = 1, i.e. when no expert_index is passed in; copied otherwise).
std::tuple<at::Tensor, at::Tensor, at::Tensor> mita_split_fwd(
    const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_, const at::Tensor& qr_,
    const std::optional<at::Tensor>& sv_, const at::Tensor& kidx_, const std::optional<at::Tensor>& eidx_,
    const std::optional<at::Tensor>& pad_, const std::optional<at::Tensor>& dup_, double scale,
    double landmark_scale, bool routed) {
  const at::Tensor q = q_.contiguous(), k = k_.contiguous(), v = v_.contiguous(), qr = qr_.contiguous();
  const at::Tensor kidx = kidx_.contiguous();
  const auto sv = contiguous_opt(sv_), eidx_in = contiguous_opt(eidx_), pad = contiguous_opt(pad_),
             dup = contiguous_opt(dup_);
  check_split_inputs(q, k, v, qr, sv, kidx, eidx_in, pad, dup, "mita_cpu.split_fwd");
  const int64_t b = q.size(0), h = q.size(1), hkv = k.size(1), n = q.size(2);
  const int64_t s = eidx_in ? eidx_in->size(3) : 1;
  at::Tensor out = at::empty({b, h, n, v.size(3)}, q.options());
  at::Tensor lse = at::empty({b, h, n}, q.options());
  // Computed here for s = 1; with s > 1 the caller's top-s routing is used and an empty tensor returned.
  at::Tensor eidx = at::empty({eidx_in ? 0 : b, h, n, 1}, kidx.options());
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "mita_cpu_split_fwd", [&] {
    const Sizes z = make_sizes<scalar_t>(n, k.size(2), q.size(3), v.size(3), kidx.size(2), kidx.size(3), s,
                                         h / hkv, h, sv.has_value(), routed);
    const scalar_t* sv_p = ptr_or_null<scalar_t>(sv);
    const bool* pad_p = ptr_or_null<bool>(pad);
    const bool* dup_p = ptr_or_null<bool>(dup);
    at::parallel_for(0, b * h, 1, [&](int64_t begin, int64_t end) {
      for (int64_t bh = begin; bh < end; ++bh) {
        const int64_t bi = bh / h, kvh = bi * hkv + (bh % h) / z.group;
        const HeadIn<scalar_t> x{q.data_ptr<scalar_t>() + bh * n * z.d, k.data_ptr<scalar_t>() + kvh * z.nk * z.d,
                                 v.data_ptr<scalar_t>() + kvh * z.nk * z.dv, sv_p ? sv_p + bh * z.m * z.dv : nullptr,
                                 qr.data_ptr<scalar_t>() + bh * n * z.m, nullptr,
                                 kidx.data_ptr<int64_t>() + bh * z.m * z.kk,
                                 eidx_in ? eidx_in->data_ptr<int64_t>() + bh * n * s : nullptr,
                                 pad_p ? pad_p + bi * z.nk : nullptr, dup_p ? dup_p + bh * n * s * z.kk : nullptr};
        const HeadOut<scalar_t> o{out.data_ptr<scalar_t>() + bh * n * z.dv, z.dv, lse.data_ptr<scalar_t>() + bh * n,
                                  eidx_in ? nullptr : eidx.data_ptr<int64_t>() + bh * n};
        forward_head<scalar_t>(x, o, static_cast<scalar_t>(scale), static_cast<scalar_t>(landmark_scale), z);
      }
    });
  });
  return {out, lse, eidx};
}

// Gradients of q (routed part only), of k and v per *query* head [B, H, N_kv, .], of qr (the shared
// logits' part) and of the shared values. The caller sums dk/dv over each GQA group.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> mita_split_bwd(
    const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_, const at::Tensor& qr_,
    const std::optional<at::Tensor>& sv_, const at::Tensor& kidx_, const at::Tensor& eidx_,
    const std::optional<at::Tensor>& pad_, const std::optional<at::Tensor>& dup_, const at::Tensor& out_,
    const at::Tensor& lse_, const at::Tensor& dout_, double scale, double landmark_scale, bool routed) {
  const at::Tensor q = q_.contiguous(), k = k_.contiguous(), v = v_.contiguous(), qr = qr_.contiguous();
  const at::Tensor kidx = kidx_.contiguous(), eidx = eidx_.contiguous();
  const at::Tensor out = out_.contiguous(), lse = lse_.contiguous(), dout = dout_.contiguous();
  const auto sv = contiguous_opt(sv_), pad = contiguous_opt(pad_), dup = contiguous_opt(dup_);
  check_split_inputs(q, k, v, qr, sv, kidx, eidx, pad, dup, "mita_cpu.split_bwd");
  const int64_t b = q.size(0), h = q.size(1), hkv = k.size(1), n = q.size(2), nk = k.size(2);
  for (const at::Tensor* t : {&out, &dout}) check_shape(*t, {b, h, n, v.size(3)}, "mita_cpu.split_bwd", "out/dout");
  check_shape(lse, {b, h, n}, "mita_cpu.split_bwd", "lse");
  at::Tensor dq = at::zeros_like(q);
  at::Tensor dk = at::zeros({b, h, nk, k.size(3)}, q.options());
  at::Tensor dv = at::zeros({b, h, nk, v.size(3)}, q.options());
  at::Tensor dqr = at::zeros_like(qr);
  at::Tensor dsv = sv ? at::zeros_like(*sv) : at::empty({0}, q.options());
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "mita_cpu_split_bwd", [&] {
    const Sizes z = make_sizes<scalar_t>(n, nk, q.size(3), v.size(3), kidx.size(2), kidx.size(3),
                                         eidx.size(3), h / hkv, h, sv.has_value(), routed);
    const scalar_t* sv_p = ptr_or_null<scalar_t>(sv);
    const bool* pad_p = ptr_or_null<bool>(pad);
    const bool* dup_p = ptr_or_null<bool>(dup);
    at::parallel_for(0, b * h, 1, [&](int64_t begin, int64_t end) {
      for (int64_t bh = begin; bh < end; ++bh) {
        const int64_t bi = bh / h, kvh = bi * hkv + (bh % h) / z.group;
        const HeadIn<scalar_t> x{q.data_ptr<scalar_t>() + bh * n * z.d, k.data_ptr<scalar_t>() + kvh * nk * z.d,
                                 v.data_ptr<scalar_t>() + kvh * nk * z.dv, sv_p ? sv_p + bh * z.m * z.dv : nullptr,
                                 qr.data_ptr<scalar_t>() + bh * n * z.m, nullptr,
                                 kidx.data_ptr<int64_t>() + bh * z.m * z.kk, eidx.data_ptr<int64_t>() + bh * n * z.s,
                                 pad_p ? pad_p + bi * nk : nullptr, dup_p ? dup_p + bh * n * z.s * z.kk : nullptr};
        const HeadGrad<scalar_t> g{out.data_ptr<scalar_t>() + bh * n * z.dv, lse.data_ptr<scalar_t>() + bh * n,
                                   dout.data_ptr<scalar_t>() + bh * n * z.dv, dq.data_ptr<scalar_t>() + bh * n * z.d,
                                   dk.data_ptr<scalar_t>() + bh * nk * z.d, dv.data_ptr<scalar_t>() + bh * nk * z.dv,
                                   dqr.data_ptr<scalar_t>() + bh * n * z.m, nullptr,
                                   sv ? dsv.data_ptr<scalar_t>() + bh * z.m * z.dv : nullptr};
        backward_head<scalar_t>(x, g, static_cast<scalar_t>(scale), static_cast<scalar_t>(landmark_scale), z);
      }
    });
  });
  return {dq, dk, dv, dqr, dsv};
}

// Order-preserving unsigned keys: larger score -> larger key (IEEE bits with the sign folded).


// ---- the whole op per head: landmark side (R K^T, top-k, softmax, A = P V, Q R^T) fused as well ----
// Needs d and dv multiples of the vector length (rows of K, V, Q and R are then used in place); the
// caller falls back to the torch-plus-kernel path otherwise. The backward recomputes the landmark side's
// probabilities P (Q R^T and A come saved from the forward), so nothing of size m x N is kept between
// forward and backward.

// Landmark side of one head, computed identically by the whole-op forward and backward.
template <typename T>
struct LandmarkHead {
  int64_t nkp, mq;  // N_kv padded to the vector length; m rounded up to QB
  std::vector<T> kt, p, a, qr, rt, w;
  std::vector<decltype(sort_key(T()))> keys;
  explicit LandmarkHead(const Sizes& z)
      : nkp(round_up(z.nk, VT<T>::L)), mq(round_up(z.m, QB)), kt(z.d * nkp), p(mq * nkp, T(0)),
        a(z.shared ? mq * z.ep : 0, T(0)), qr(round_up(z.n, QB) * z.m, T(0)), rt(z.d * z.mp, T(0)),
        w(QB * std::max(nkp, z.mp)), keys(z.nk) {}

  // Scores c R K^T (-inf at padded keys and padding columns), top-k per landmark when kidx_out is given,
  // then (shared expert) probabilities P in place and A = P V; and qr = Q R^T.
  // outputs = false (the backward, which has A and qr saved): only the probabilities P.
  void compute(const T* q, const T* k, const T* v, const T* r, const bool* pad, T scale, const Sizes& z,
               int64_t* kidx_out, bool outputs = true) {
    transpose_rows(k, z.nk, z.d, z.d, kt.data(), nkp);
    for (int64_t c = 0; c < z.d; ++c) std::fill(kt.begin() + c * nkp + z.nk, kt.begin() + (c + 1) * nkp, T(0));
    const T* xr[QB];
    for (int64_t j0 = 0; j0 < z.m; j0 += QB) {
      const int64_t nb = std::min(QB, z.m - j0);
      for (int64_t b = 0; b < QB; ++b) xr[b] = r + (j0 + std::min(b, nb - 1)) * z.d;
      mk_xbt(xr, kt.data(), z.d, nkp, w.data());
      for (int64_t b = 0; b < nb; ++b) {
        T* row = p.data() + (j0 + b) * nkp;
        const T* src = w.data() + b * nkp;
        for (int64_t t = 0; t < z.nk; ++t) row[t] = (pad != nullptr && pad[t]) ? neg_inf<T>() : src[t] * scale;
        std::fill(row + z.nk, row + nkp, neg_inf<T>());
        if (kidx_out != nullptr) topk_row(row, z.nk, z.kk, kidx_out + (j0 + b) * z.kk, keys);
      }
    }
    if (z.shared) {
      for (int64_t j = 0; j < z.m; ++j) {
        T* row = p.data() + j * nkp;
        const T mx = padded_max(row, nkp);
        if (mx == neg_inf<T>()) {  // every key padded: no shared value (0), as no key is attended
          std::fill(row, row + nkp, T(0));
          continue;
        }
        for (int64_t t = 0; t < nkp; ++t) row[t] -= mx;
        exp_inplace(row, nkp);
        const T inv = T(1) / padded_sum(row, nkp);
        for (int64_t t = 0; t < nkp; ++t) row[t] *= inv;
      }
      if (!outputs) return;
      std::fill(a.begin(), a.end(), T(0));  // reused across heads; mk_pb accumulates
      T* ar[QB];
      for (int64_t j0 = 0; j0 < z.m; j0 += QB) {
        for (int64_t b = 0; b < QB; ++b) ar[b] = a.data() + (j0 + b) * z.ep;
        mk_pb(p.data() + j0 * nkp, nkp, v, z.nk, z.ep, ar);
      }
    }
    if (!outputs) return;
    for (int64_t j = 0; j < z.m; ++j)
      for (int64_t c = 0; c < z.d; ++c) rt[c * z.mp + j] = r[j * z.d + c];
    for (int64_t i0 = 0; i0 < z.n; i0 += QB) {
      const int64_t nb = std::min(QB, z.n - i0);
      for (int64_t b = 0; b < QB; ++b) xr[b] = q + (i0 + std::min(b, nb - 1)) * z.d;
      mk_xbt(xr, rt.data(), z.d, z.mp, w.data());
      for (int64_t b = 0; b < nb; ++b) std::memcpy(qr.data() + (i0 + b) * z.m, w.data() + b * z.mp, sizeof(T) * z.m);
    }
  }
};

template <typename T>
void backward_landmarks(const T* q, const T* k, const T* v, const T* r, const LandmarkHead<T>& lh, const T* a,
                        const T* dqr, const T* da, T scale, const Sizes& z, T* dq, T* dk, T* dvv, T* dr) {
  // d qr = [n x m] (the qr rows past n are zero): dQ += dqr R, dR += dqr^T Q.
  std::vector<T> dra(lh.mq * z.dp, T(0)), xb(QB * std::max(z.dp, z.ep)), junk(z.dp);
  T* rows[QB];
  int64_t idx[QB];
  for (int64_t i0 = 0; i0 < z.n; i0 += QB) {
    const int64_t nb = std::min(QB, z.n - i0);
    for (int64_t b = 0; b < QB; ++b) rows[b] = b < nb ? dq + (i0 + b) * z.d : junk.data();
    mk_pb(dqr + i0 * z.m, z.m, r, z.m, z.dp, rows);
    for (int64_t b = 0; b < nb; ++b) idx[b] = i0 + b;
    gather_rows(q, z.d, idx, nb, z.dp, xb.data());
    mk_rank(dqr + i0 * z.m, z.m, xb.data(), z.m, z.dp, dra.data());
  }
  // Shared values A = softmax(c R K^T) V: dP = dA V^T, dS = P (dP - rowsum(dA A)) c,
  // dR += dS K, dK += dS^T R, dV += P^T dA; four landmarks at a time.
  if (z.shared) {
    const int64_t nkp = lh.nkp;
    std::vector<T> vt(z.dv * nkp, T(0)), ds(QB * nkp), dab(QB * z.ep);
    transpose_rows(v, z.nk, z.dv, z.dv, vt.data(), nkp);
    for (int64_t j0 = 0; j0 < z.m; j0 += QB) {
      const int64_t nb = std::min(QB, z.m - j0);
      for (int64_t b = 0; b < nb; ++b) idx[b] = j0 + b;
      gather_rows(da, z.dv, idx, nb, z.ep, dab.data());
      const T* xr[QB] = {dab.data(), dab.data() + z.ep, dab.data() + 2 * z.ep, dab.data() + 3 * z.ep};
      mk_xbt(xr, vt.data(), z.dv, nkp, ds.data());  // dP
      for (int64_t b = 0; b < QB; ++b) {
        T* g = ds.data() + b * nkp;
        if (b >= nb) {
          std::fill(g, g + nkp, T(0));
          continue;
        }
        const T* pr = lh.p.data() + (j0 + b) * nkp;
        const T* ar = a + (j0 + b) * z.dv;
        const T dot = dot_row(dab.data() + b * z.ep, ar, z.dv);
        for (int64_t t = 0; t < nkp; ++t) g[t] = pr[t] * (g[t] - dot) * scale;
      }
      T* rr[QB] = {dra.data() + j0 * z.dp, dra.data() + (j0 + 1) * z.dp, dra.data() + (j0 + 2) * z.dp,
                   dra.data() + (j0 + 3) * z.dp};
      mk_pb(ds.data(), nkp, k, z.nk, z.dp, rr);
      gather_rows(r, z.d, idx, nb, z.dp, xb.data());
      mk_rank(ds.data(), nkp, xb.data(), z.nk, z.dp, dk);
      mk_rank(lh.p.data() + j0 * nkp, nkp, dab.data(), z.nk, z.ep, dvv);
    }
  }
  for (int64_t j = 0; j < z.m; ++j) std::memcpy(dr + j * z.d, dra.data() + j * z.dp, sizeof(T) * z.d);
}

// One (batch, head) of a [B, H, N, w] tensor whose rows are unit-stride: its first row and row stride.
template <typename T>
struct HeadView {
  T* p;
  int64_t ld;
};
template <typename T>
HeadView<T> head_of(const at::Tensor& t, int64_t bi, int64_t hi) {
  return {t.data_ptr<T>() + bi * t.stride(0) + hi * t.stride(1), t.stride(2)};
}

// The head's n rows of width w, packed: the tensor's own memory when they already are, else a copy in buf
// (q, k, v as views of a [B, N, H, d] projection are read in place of a whole-tensor .contiguous()).
template <typename T>
const T* packed(HeadView<T> h, int64_t n, int64_t w, std::vector<T>& buf) {
  if (h.ld == w) return h.p;
  buf.resize(n * w);
  for (int64_t i = 0; i < n; ++i) std::memcpy(buf.data() + i * w, h.p + i * h.ld, sizeof(T) * w);
  return buf.data();
}

// As packed, with padded rows zeroed when there is a padding mask: padding is excluded by selection, so
// a NaN there never meets a weight of 0 (the landmark side multiplies P V over every key).
template <typename T>
const T* packed_unpadded(HeadView<T> h, int64_t n, int64_t w, std::vector<T>& buf, const bool* pad) {
  if (pad == nullptr) return packed(h, n, w, buf);
  buf.resize(n * w);
  for (int64_t i = 0; i < n; ++i) {
    if (pad[i])
      std::fill(buf.begin() + i * w, buf.begin() + (i + 1) * w, T(0));
    else
      std::memcpy(buf.data() + i * w, h.p + i * h.ld, sizeof(T) * w);
  }
  return buf.data();
}

// Gradient rows to accumulate into, zeroed: the destination itself when packed, else buf (see flush).
template <typename T>
T* zeroed(HeadView<T> h, int64_t n, int64_t w, std::vector<T>& buf) {
  T* dst = h.p;
  if (h.ld != w) {
    buf.resize(n * w);
    dst = buf.data();
  }
  std::fill(dst, dst + n * w, T(0));
  return dst;
}
template <typename T>
void flush(HeadView<T> h, int64_t n, int64_t w, const T* src) {
  if (src == h.p) return;
  for (int64_t i = 0; i < n; ++i) std::memcpy(h.p + i * h.ld, src + i * w, sizeof(T) * w);
}

at::Tensor unit_rows(const at::Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); }

void check_whole_op(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& r) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4 && r.dim() == 4, "mita_cpu: q, k, v, r must be 4-D");
  check_gather_offsets(k, v, "mita_cpu");
  const int64_t lanes = q.scalar_type() == at::kDouble ? 8 : 16;
  TORCH_CHECK(q.size(3) % lanes == 0 && v.size(3) % lanes == 0,
              "mita_cpu.whole: head dims must be multiples of ", lanes);
  TORCH_CHECK(k.size(0) == q.size(0) && v.size(0) == q.size(0) && k.size(1) >= 1 && q.size(1) % k.size(1) == 0 &&
                  v.size(1) == k.size(1) && v.size(2) == k.size(2) && k.size(3) == q.size(3) &&
                  r.size(0) == q.size(0) && r.size(1) == q.size(1) && r.size(3) == q.size(3),
              "mita_cpu.whole: q [B,H,N,d], k/v [B,H_kv,N_kv,d/dv] (H % H_kv == 0), landmarks [B,H,m,d]");
}

// out [B,H,N,dv], lse [B,H,N], expert_index [B,H,N,1] (argmax routing), key_index [B,H,m,k].
// With save = true and the shared expert on, also qr = Q R^T [B,H,N,m] and the shared values A [B,H,m,dv]
// for the backward (which then recomputes only the probabilities P); else two empty tensors.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> mita_whole_fwd(
    const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_, const at::Tensor& r_,
    const std::optional<at::Tensor>& pad_, int64_t topk, double scale, double landmark_scale, bool shared,
    bool routed, bool save) {
  const at::Tensor q = unit_rows(q_), k = unit_rows(k_), v = unit_rows(v_), r = r_.contiguous();
  const auto pad = contiguous_opt(pad_);
  check_whole_op(q, k, v, r);
  const int64_t b = q.size(0), h = q.size(1), hkv = k.size(1), n = q.size(2), nk = k.size(2), m = r.size(2);
  TORCH_CHECK(topk >= 1 && topk <= nk, "mita_cpu.whole: topk must be in 1..N_kv");
  check_mask(pad, {b, nk}, "mita_cpu.whole_fwd", "pad");
  // [B, N, H, dv] underneath, as SDPA's output: merging the heads afterwards is a view, not a copy.
  at::Tensor out = at::empty({b, n, h, v.size(3)}, q.options()).permute({0, 2, 1, 3});
  at::Tensor lse = at::empty({b, h, n}, q.options());
  at::Tensor eidx = at::empty({b, h, n, 1}, q.options().dtype(at::kLong));
  at::Tensor kidx = at::empty({b, h, m, topk}, q.options().dtype(at::kLong));
  at::Tensor qr_s = at::empty({save && shared ? b : 0, h, n, m}, q.options());  // read only by the shared part
  at::Tensor a_s = at::empty({save && shared ? b : 0, h, m, v.size(3)}, q.options());
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "mita_cpu_whole_fwd", [&] {
    const Sizes z = make_sizes<scalar_t>(n, nk, q.size(3), v.size(3), m, topk, 1, h / hkv, h, shared, routed);
    const bool* pad_p = ptr_or_null<bool>(pad);
    at::parallel_for(0, b * h, 1, [&](int64_t begin, int64_t end) {
      LandmarkHead<scalar_t> lh(z);
      std::vector<scalar_t> qb, kb, vb;
      for (int64_t bh = begin; bh < end; ++bh) {
        const int64_t bi = bh / h, hi = bh % h, kvi = hi / z.group;
        const scalar_t* qh = packed(head_of<scalar_t>(q, bi, hi), n, z.d, qb);
        const bool* padh = pad_p ? pad_p + bi * nk : nullptr;
        const scalar_t* kh = packed_unpadded(head_of<scalar_t>(k, bi, kvi), nk, z.d, kb, padh);
        const scalar_t* vh = packed_unpadded(head_of<scalar_t>(v, bi, kvi), nk, z.dv, vb, padh);
        const HeadView<scalar_t> oh = head_of<scalar_t>(out, bi, hi);
        int64_t* ki = kidx.data_ptr<int64_t>() + bh * m * topk;
        lh.compute(qh, kh, vh, r.data_ptr<scalar_t>() + bh * m * z.d, padh, static_cast<scalar_t>(scale), z, ki);
        const HeadIn<scalar_t> x{qh, kh, vh, shared ? lh.a.data() : nullptr, lh.qr.data(), nullptr, ki, nullptr,
                                 padh, nullptr};
        const HeadOut<scalar_t> o{oh.p, oh.ld, lse.data_ptr<scalar_t>() + bh * n, eidx.data_ptr<int64_t>() + bh * n};
        forward_head<scalar_t>(x, o, static_cast<scalar_t>(scale), static_cast<scalar_t>(landmark_scale), z);
        if (save && shared) {
          std::memcpy(qr_s.data_ptr<scalar_t>() + bh * n * m, lh.qr.data(), sizeof(scalar_t) * n * m);
          std::memcpy(a_s.data_ptr<scalar_t>() + bh * m * z.dv, lh.a.data(), sizeof(scalar_t) * m * z.dv);
        }
      }
    });
  });
  return {out, lse, eidx, kidx, qr_s, a_s};
}

// dq [B,H,N,d], dk and dv per *query* head [B,H,N_kv,.] (the caller sums GQA groups), dr [B,H,m,d].
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> mita_whole_bwd(
    const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_, const at::Tensor& r_,
    const std::optional<at::Tensor>& pad_, const at::Tensor& kidx_, const at::Tensor& eidx_,
    const at::Tensor& out_, const at::Tensor& lse_, const at::Tensor& qr_, const at::Tensor& a_,
    const at::Tensor& dout_, double scale, double landmark_scale, bool shared, bool routed) {
  const at::Tensor q = unit_rows(q_), k = unit_rows(k_), v = unit_rows(v_), r = r_.contiguous();
  const at::Tensor kidx = kidx_.contiguous(), eidx = eidx_.contiguous();
  const at::Tensor qr = qr_.contiguous(), a = a_.contiguous();  // saved by the forward (save = true)
  TORCH_CHECK(!shared || (qr.dim() == 4 && qr.size(0) == q.size(0) && a.dim() == 4 && a.size(0) == q.size(0)),
              "mita_cpu.whole_bwd: qr and shared_values must come from a forward run with save=True");
  const at::Tensor out = unit_rows(out_), lse = lse_.contiguous(), dout = unit_rows(dout_);
  const auto pad = contiguous_opt(pad_);
  check_whole_op(q, k, v, r);
  const int64_t b = q.size(0), h = q.size(1), hkv = k.size(1), n = q.size(2), nk = k.size(2), m = r.size(2);
  const char* op = "mita_cpu.whole_bwd";
  TORCH_CHECK(kidx.dim() == 4 && kidx.size(3) >= 1 && kidx.size(3) <= nk, op, ": key_index [B, H, m, k]");
  const int64_t topk = kidx.size(3);
  check_shape(kidx, {b, h, m, topk}, op, "key_index");
  check_range(kidx, 0, nk, op, "key_index");
  check_shape(eidx, {b, h, n, 1}, op, "expert_index");
  check_range(eidx, 0, m, op, "expert_index");
  check_shape(out, {b, h, n, v.size(3)}, op, "out");
  check_shape(dout, {b, h, n, v.size(3)}, op, "dout");
  check_shape(lse, {b, h, n}, op, "lse");
  check_mask(pad, {b, nk}, op, "pad");
  if (shared) {
    check_shape(qr, {b, h, n, m}, op, "qr");
    check_shape(a, {b, h, m, v.size(3)}, op, "shared_values");
  }
  // Gradients in their inputs' layouts (empty_like keeps a dense permuted layout), so the backward of the
  // head split is a view too. GQA: per query head, summed over the group by the caller.
  at::Tensor dq = at::empty_like(q);
  at::Tensor dk = h == hkv ? at::empty_like(k) : at::empty({b, h, nk, k.size(3)}, q.options());
  at::Tensor dv = h == hkv ? at::empty_like(v) : at::empty({b, h, nk, v.size(3)}, q.options());
  at::Tensor dr = at::empty_like(r);
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "mita_cpu_whole_bwd", [&] {
    using T = scalar_t;
    const Sizes z = make_sizes<T>(n, nk, q.size(3), v.size(3), m, topk, 1, h / hkv, h, shared, routed);
    const bool* pad_p = ptr_or_null<bool>(pad);
    at::parallel_for(0, b * h, 1, [&](int64_t begin, int64_t end) {
      LandmarkHead<T> lh(z);
      std::vector<T> dqr(round_up(z.n, QB) * z.m, T(0)), da(shared ? z.m * z.dv : 0);
      std::vector<T> qb, kb, vb, ob, gb, dqb, dkb, dvb;
      for (int64_t bh = begin; bh < end; ++bh) {
        const int64_t bi = bh / h, hi = bh % h, kvi = hi / z.group;
        const T* qh = packed(head_of<T>(q, bi, hi), n, z.d, qb);
        const bool* padh = pad_p ? pad_p + bi * nk : nullptr;
        const T* kh = packed_unpadded(head_of<T>(k, bi, kvi), nk, z.d, kb, padh);
        const T* vh = packed_unpadded(head_of<T>(v, bi, kvi), nk, z.dv, vb, padh);
        const T* oh = packed(head_of<T>(out, bi, hi), n, z.dv, ob);
        const T* gh = packed(head_of<T>(dout, bi, hi), n, z.dv, gb);
        const T* rh = r.data_ptr<T>() + bh * m * z.d;
        const int64_t* ki = kidx.data_ptr<int64_t>() + bh * m * topk;
        const int64_t gk = h == hkv ? kvi : hi;  // which head of dk/dv this query head writes
        const HeadView<T> dqv = head_of<T>(dq, bi, hi), dkv = head_of<T>(dk, bi, gk), dvv = head_of<T>(dv, bi, gk);
        T* dqh = zeroed(dqv, n, z.d, dqb);
        T* dkh = zeroed(dkv, nk, z.d, dkb);
        T* dvh = zeroed(dvv, nk, z.dv, dvb);
        const T* qrh = shared ? qr.data_ptr<T>() + bh * n * m : nullptr;
        const T* ah = shared ? a.data_ptr<T>() + bh * m * z.dv : nullptr;
        if (shared) lh.compute(qh, kh, vh, rh, padh, static_cast<T>(scale), z, nullptr, false);  // P only
        const HeadIn<T> x{qh, kh, vh, ah, qrh, nullptr, ki, eidx.data_ptr<int64_t>() + bh * n, padh, nullptr};
        const HeadGrad<T> g{oh, lse.data_ptr<T>() + bh * n, gh, dqh, dkh, dvh, dqr.data(), nullptr,
                            shared ? da.data() : nullptr};
        backward_head<T>(x, g, static_cast<T>(scale), static_cast<T>(landmark_scale), z);
        T* drh = dr.data_ptr<T>() + bh * m * z.d;
        if (shared) {
          backward_landmarks<T>(qh, kh, vh, rh, lh, ah, dqr.data(), da.data(), static_cast<T>(scale), z, dqh, dkh, dvh,
                                drh);
        } else {
          std::fill(drh, drh + m * z.d, T(0));  // routing only: the landmarks only choose (no gradient)
        }
        flush(dqv, n, z.d, dqh);
        flush(dkv, nk, z.d, dkh);
        flush(dvv, nk, z.dv, dvh);
      }
    });
  });
  return {dq, dk, dv, dr};
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
      "split_fwd(Tensor q, Tensor k, Tensor v, Tensor qr, Tensor? shared_values, Tensor key_index, "
      "Tensor? expert_index, Tensor? pad, Tensor? dup, float scale, float landmark_scale, bool routed) "
      "-> (Tensor, Tensor, Tensor)");
  m.def(
      "split_bwd(Tensor q, Tensor k, Tensor v, Tensor qr, Tensor? shared_values, Tensor key_index, "
      "Tensor expert_index, Tensor? pad, Tensor? dup, Tensor out, Tensor lse, Tensor dout, float scale, "
      "float landmark_scale, bool routed) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("topk(Tensor scores, int k) -> Tensor");
  m.def(
      "whole_fwd(Tensor q, Tensor k, Tensor v, Tensor r, Tensor? pad, int topk, float scale, "
      "float landmark_scale, bool shared, bool routed, bool save) -> (Tensor, Tensor, Tensor, Tensor, Tensor, "
      "Tensor)");
  m.def(
      "whole_bwd(Tensor q, Tensor k, Tensor v, Tensor r, Tensor? pad, Tensor key_index, Tensor expert_index, "
      "Tensor out, Tensor lse, Tensor qr, Tensor shared_values, Tensor dout, float scale, float landmark_scale, "
      "bool shared, bool routed) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(mita_cpu, CPU, m) {
  m.impl("split_fwd", &mita_split_fwd);
  m.impl("split_bwd", &mita_split_bwd);
  m.impl("topk", &mita_topk);
  m.impl("whole_fwd", &mita_whole_fwd);
  m.impl("whole_bwd", &mita_whole_bwd);
}
