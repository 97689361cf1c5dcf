// Layer 3: torch.autocast("mps_ext").
//
// The AutocastPrivateUse1 dispatch key gets torch's shared autocast op lists
// (ATen/autocast_mode.h: AT_FORALL_LOWER_PRECISION_FP, AT_FORALL_FP32, ...),
// the lists CUDA uses: matmuls and convolutions run in the autocast dtype
// (float16 by default, bfloat16 on request), precision-sensitive ops
// (softmax, norms, losses, exp/log, ...) in float32, and multi-input ops
// like addcmul in the widest input type. Everything else falls through.
//
// In mps fidelity mode the lists are MPS's (torch 2.13 registers its own for
// AutocastMPS, a subset of the shared ones): an operator MPS does not list
// keeps its dtypes (gru_cell, the rnn cells, linalg_vecdot, rms_norm, vdot,
// the upsample family; binary_cross_entropy is not refused), conv_transpose3d
// runs in float32 (MPS has no half 3-D transposed convolution) and batch_norm
// in float32. The choice is made per call (`ByMode`), so the mode can change
// at any time; norm's dtype-appending overloads, which MPS does not list
// either, keep their dtypes in mps mode.
//
// This file includes the full ATen operator headers (autocast_mode.h needs
// them); it is the only one that does, so ccache keeps rebuilds cheap.
#include "runtime/Fidelity.h"

#include <ATen/autocast_mode.h>
#include <torch/library.h>

#include <string>
#include <string_view>

namespace torch_mps_ext {
namespace {

// As on CUDA: binary_cross_entropy on autocast float16 inputs loses too much
// precision to be safe, so autocast refuses it (MPS lets it through).
at::Tensor binaryCrossEntropyBanned(c10::DispatchKeySet ks, const at::Tensor& self,
                                    const at::Tensor& target,
                                    const std::optional<at::Tensor>& weight, int64_t reduction) {
  if (runtime::fidelity::on()) {
    return at::_ops::binary_cross_entropy::redispatch(
        ks & c10::DispatchKeySet(c10::DispatchKeySet::FULL_AFTER,
                                 c10::DispatchKey::AutocastPrivateUse1),
        self, target, weight, reduction);
  }
  TORCH_CHECK(
      false,
      "torch.nn.functional.binary_cross_entropy and torch.nn.BCELoss are unsafe "
      "to autocast.\nMany models use a sigmoid layer right before the binary "
      "cross entropy layer.\nIn this case, combine the two layers using "
      "torch.nn.functional.binary_cross_entropy_with_logits\nor "
      "torch.nn.BCEWithLogitsLoss.  binary_cross_entropy_with_logits and "
      "BCEWithLogits are\nsafe to autocast.");
}

// MPS's autocast lists (torch 2.13's AutocastMPS registrations), by policy.
// Its reductions and softmaxes (sum, prod, cumsum, cumprod, softmax,
// log_softmax, linalg_vector_norm, linalg_matrix_norm) are listed as fp32
// there and as fp32_set_opt_dtype here: both give float32 results.
constexpr std::string_view kMpsLowerPrecision[] = {
    "_convolution.deprecated", "_convolution", "conv1d", "conv2d", "conv3d", "conv_tbc",
    "conv_transpose1d", "conv_transpose2d.input", "convolution", "prelu", "addmm", "addmv",
    "addr", "matmul", "einsum", "mm", "mv", "linear", "addbmm", "baddbmm", "bmm",
    "chain_matmul", "linalg_multi_dot", "lstm_cell", "scaled_dot_product_attention"};
constexpr std::string_view kMpsFp32[] = {
    "acos", "asin", "cosh", "erfinv", "exp", "expm1", "log", "log10", "log2", "log1p",
    "reciprocal", "rsqrt", "sinh", "tan", "pow.Tensor_Scalar", "pow.Tensor_Tensor",
    "pow.Scalar", "softplus", "layer_norm", "native_layer_norm", "group_norm",
    "frobenius_norm.dim", "nuclear_norm", "nuclear_norm.dim", "cosine_similarity",
    "poisson_nll_loss", "cosine_embedding_loss", "nll_loss", "nll_loss2d",
    "hinge_embedding_loss", "kl_div", "l1_loss", "smooth_l1_loss", "huber_loss", "mse_loss",
    "margin_ranking_loss", "multilabel_margin_loss", "soft_margin_loss", "triplet_margin_loss",
    "multi_margin_loss", "binary_cross_entropy_with_logits", "dist", "pdist", "cdist", "renorm",
    "logsumexp", "conv_transpose3d.input", "batch_norm"};
constexpr std::string_view kMpsPromote[] = {
    "addcdiv", "addcmul", "atan2", "bilinear", "cross", "dot", "grid_sampler", "index_put",
    "tensordot", "scatter_add"};

template <size_t N>
bool listed(const std::string_view (&list)[N], std::string_view name) {
  for (std::string_view e : list) {
    if (e == name) return true;
  }
  return false;
}

// MPS's policy for `name` ("aten::op" or "aten::op.overload").
enum class MpsPolicy { kNone, kLowerPrecision, kFp32, kPromote };
MpsPolicy mpsPolicy(std::string_view name) {
  name.remove_prefix(std::string_view("aten::").size());
  if (listed(kMpsLowerPrecision, name)) return MpsPolicy::kLowerPrecision;
  if (listed(kMpsFp32, name)) return MpsPolicy::kFp32;
  if (listed(kMpsPromote, name)) return MpsPolicy::kPromote;
  return MpsPolicy::kNone;
}

// Keys after AutocastPrivateUse1: what an operator autocast does not list
// reaches. Like the dispatcher's fallthrough, the operators it calls in turn
// are autocast again (a composite's matmuls, say).
constexpr c10::DispatchKeySet kAfterAutocast(c10::DispatchKeySet::FULL_AFTER,
                                             c10::DispatchKey::AutocastPrivateUse1);

// The operator `Op` (at::_ops::...) below autocast, dtypes as given.
template <class Op, class Sig>
struct Below;
template <class Op, class Ret, class... Args>
struct Below<Op, Ret(Args...)> {
  static Ret call(c10::DispatchKeySet ks, Args... args) {
    return Op::redispatch(ks & kAfterAutocast, args...);
  }
};

// The operator `Name::get()` ("aten::norm.Scalar") below autocast, for the
// registrations whose macros name an operator only by its string.
template <class Name, class Sig>
struct BelowNamed;
template <class Name, class Ret, class... Args>
struct BelowNamed<Name, Ret(Args...)> {
  static Ret call(c10::DispatchKeySet ks, Args... args) {
    static const auto op = [] {
      const std::string_view full = Name::get();
      const auto dot = full.find('.');
      return c10::Dispatcher::singleton()
          .findSchemaOrThrow(std::string(full.substr(0, dot)).c_str(),
                             dot == std::string_view::npos
                                 ? ""
                                 : std::string(full.substr(dot + 1)).c_str())
          .template typed<Ret(Args...)>();
    }();
    return op.redispatch(ks & kAfterAutocast, args...);
  }
};

// A torch autocast wrapper (no key set), as `Below` is called.
template <class Wrapped, class Sig>
struct Keyed;
template <class Wrapped, class Ret, class... Args>
struct Keyed<Wrapped, Ret(Args...)> {
  static Ret call(c10::DispatchKeySet, Args... args) { return Wrapped::call(args...); }
};

// `Default` off, `InMps` in mps fidelity mode.
template <class Sig, class Default, class InMps>
struct ByMode;
template <class Ret, class... Args, class Default, class InMps>
struct ByMode<Ret(Args...), Default, InMps> {
  static Ret call(c10::DispatchKeySet ks, Args... args) {
    if (C10_UNLIKELY(runtime::fidelity::on())) return InMps::call(ks, args...);
    return Default::call(ks, args...);
  }
};

template <at::autocast::CastPolicy policy, class Op>
using Wrap = Keyed<typename at::autocast::WrapFunction<policy, c10::DeviceType::PrivateUse1,
                                                       typename Op::schema, typename Op::schema,
                                                       &Op::call>::type,
                   typename Op::schema>;

// Registers `Op` with the shared list's `policy`, made MPS's in mps mode:
// the same where MPS lists it with that policy, fp32 or none otherwise.
template <at::autocast::CastPolicy policy, class Op>
void registerShared(torch::Library& m, const char* name, MpsPolicy same) {
  using at::autocast::CastPolicy;
  using Sig = typename Op::schema;
  const MpsPolicy mps = mpsPolicy(name);
  if (mps == same) {
    m.impl(name, &at::autocast::WrapFunction<policy, c10::DeviceType::PrivateUse1, Sig, Sig,
                                             &Op::call>::type::call);
  } else if (mps == MpsPolicy::kFp32) {
    m.impl(name, &ByMode<Sig, Wrap<policy, Op>, Wrap<CastPolicy::fp32, Op>>::call);
  } else {
    m.impl(name, &ByMode<Sig, Wrap<policy, Op>, Below<Op, Sig>>::call);
  }
}

// An operator only MPS lists, with `policy`: in mps mode only.
template <at::autocast::CastPolicy policy, class Op>
void registerMpsOnly(torch::Library& m, const char* name) {
  using Sig = typename Op::schema;
  m.impl(name, &ByMode<Sig, Below<Op, Sig>, Wrap<policy, Op>>::call);
}

} // namespace
} // namespace torch_mps_ext

namespace at::autocast {
namespace {

TORCH_LIBRARY_IMPL(_, AutocastPrivateUse1, m) {
  m.fallback(torch::CppFunction::makeFallthrough());
}

TORCH_LIBRARY_IMPL(aten, AutocastPrivateUse1, m) {
  using torch_mps_ext::MpsPolicy;
#define MPS_EXT_SHARED1(POLICY, SAME, OP, _) \
  torch_mps_ext::registerShared<CastPolicy::POLICY, ATEN_OP(OP)>(m, "aten::" #OP, SAME);
#define MPS_EXT_SHARED2(POLICY, SAME, OP, OVERLOAD, _)                          \
  torch_mps_ext::registerShared<CastPolicy::POLICY, ATEN_OP2(OP, OVERLOAD)>( \
      m, "aten::" #OP "." #OVERLOAD, SAME);
#define MPS_EXT_SHARED_N(NARG, ...) C10_CONCATENATE(MPS_EXT_SHARED, NARG)(__VA_ARGS__)
// (OP) or (OP, OVERLOAD): counted as KERNEL counts them, with one more argument.
#define MPS_EXT_SHARED(POLICY, SAME, ...) \
  MPS_EXT_SHARED_N(_KERNEL_OVERLOAD_NARG(__VA_ARGS__, _), POLICY, SAME, __VA_ARGS__, _)
#define MPS_EXT_LOWER_PRECISION_FP(...) \
  MPS_EXT_SHARED(lower_precision_fp, MpsPolicy::kLowerPrecision, __VA_ARGS__)
#define MPS_EXT_FP32(...) MPS_EXT_SHARED(fp32, MpsPolicy::kFp32, __VA_ARGS__)
#define MPS_EXT_PROMOTE(...) MPS_EXT_SHARED(promote, MpsPolicy::kPromote, __VA_ARGS__)
#define MPS_EXT_FP32_SET_OPT_DTYPE(...) \
  KERNEL_PRIVATEUSEONE(__VA_ARGS__, fp32_set_opt_dtype)

  AT_FORALL_LOWER_PRECISION_FP(MPS_EXT_LOWER_PRECISION_FP)
  AT_FORALL_FP32(MPS_EXT_FP32)
  AT_FORALL_FP32_SET_OPT_DTYPE(MPS_EXT_FP32_SET_OPT_DTYPE)
  // norm's overloads that append float32 as their dtype: MPS lists none of
  // them, so in mps mode they keep their dtypes.
#define MPS_EXT_DIFFERENT_REDISPATCH(REDISPATCH_FUNC, REGISTER_NAME, REGISTER_SIGNATURE,      \
                                     REDISPATCH_SIGNATURE, POLICY)                           \
  {                                                                                          \
    struct Name {                                                                            \
      static const char* get() { return "aten::" REGISTER_NAME; }                           \
    };                                                                                       \
    m.impl(TORCH_SELECTIVE_NAME("aten::" REGISTER_NAME),                                     \
           &torch_mps_ext::ByMode<                                                           \
               REGISTER_SIGNATURE,                                                           \
               torch_mps_ext::Keyed<                                                         \
                   WrapFunction<CastPolicy::POLICY, c10::DeviceType::PrivateUse1,            \
                                REGISTER_SIGNATURE, REDISPATCH_SIGNATURE,                    \
                                &REDISPATCH_FUNC>::type,                                     \
                   REGISTER_SIGNATURE>,                                                      \
               torch_mps_ext::BelowNamed<Name, REGISTER_SIGNATURE>>::call);                  \
  }
  AT_FORALL_DIFFERENT_REDISPATCH_SIGNATURE(MPS_EXT_DIFFERENT_REDISPATCH)
  AT_FORALL_PROMOTE(MPS_EXT_PROMOTE)
  torch_mps_ext::registerMpsOnly<CastPolicy::fp32, ATEN_OP(batch_norm)>(m, "aten::batch_norm");

#undef MPS_EXT_SHARED1
#undef MPS_EXT_SHARED2
#undef MPS_EXT_SHARED
#undef MPS_EXT_SHARED_N
#undef MPS_EXT_LOWER_PRECISION_FP
#undef MPS_EXT_FP32
#undef MPS_EXT_FP32_SET_OPT_DTYPE
#undef MPS_EXT_PROMOTE
#undef MPS_EXT_DIFFERENT_REDISPATCH

  m.impl(TORCH_SELECTIVE_NAME("aten::binary_cross_entropy"),
         TORCH_FN((&torch_mps_ext::binaryCrossEntropyBanned)));
}

} // namespace
} // namespace at::autocast
