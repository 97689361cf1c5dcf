// Layer 3: the fused LSTM/GRU cell operators of recurrent networks.
//
// ATen's recurrent layers (nn.LSTM, nn.GRU, nn.LSTMCell, nn.GRUCell) take a
// fused-cell route for every accelerator: RNN.cpp's cells check
// `is_cuda() || is_xpu() || is_privateuseone()` and call
// `_thnn_fused_lstm_cell` / `_thnn_fused_gru_cell` (and their backward
// operators), which only CUDA implements. The boxed fallback cannot serve
// them (CPU has no kernel), so mps_ext provides them here, built from device
// operators. The forward adds the gates in the order CPU's unfused cell does,
// (x·W_ih + b_ih) + (h·W_hh + b_hh), so forward results are CPU's bit for bit;
// the backward is the closed form of the cell's derivative.
//
// Workspaces (what the forward saves for its backward; their layout is ours,
// since both sides are ours): LSTM, the activated gates [i, f, g, o] (N×4H);
// GRU, [r, z, n, h_n + b_hn, hx] (N×5H).
#include <ATen/core/Tensor.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/rsub.h>
#include <ATen/ops/zeros_like.h>
#include <torch/library.h>

#include <tuple>

namespace torch_mps_ext {
namespace {

// Adds the bias to a gates tensor (bias undefined: the gates as they are).
at::Tensor withBias(const at::Tensor& gates, const std::optional<at::Tensor>& bias) {
  return bias && bias->defined() ? gates.add(*bias) : gates;
}

// 1 - t
at::Tensor oneMinus(const at::Tensor& t) {
  return at::rsub(t, 1);
}

void checkCellArgs(const char* op, const at::Tensor& input_gates,
                   const at::Tensor& hidden_gates, const at::Tensor& state, int64_t chunks) {
  TORCH_CHECK(input_gates.dim() == 2 && hidden_gates.sizes() == input_gates.sizes(), op,
              ": input_gates and hidden_gates must be 2-D and of the same size, got ",
              input_gates.sizes(), " and ", hidden_gates.sizes());
  TORCH_CHECK(state.dim() == 2 && state.size(0) == input_gates.size(0) &&
                  state.size(1) * chunks == input_gates.size(1),
              op, ": the state's size ", state.sizes(), " does not match gates of size ",
              input_gates.sizes());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fused_lstm_cell(
    const at::Tensor& input_gates, const at::Tensor& hidden_gates, const at::Tensor& cx,
    const std::optional<at::Tensor>& input_bias, const std::optional<at::Tensor>& hidden_bias) {
  checkCellArgs("_thnn_fused_lstm_cell", input_gates, hidden_gates, cx, 4);
  at::Tensor gates = withBias(input_gates, input_bias).add(withBias(hidden_gates, hidden_bias));
  auto chunks = gates.chunk(4, 1);
  at::Tensor i = chunks[0].sigmoid();
  at::Tensor f = chunks[1].sigmoid();
  at::Tensor g = chunks[2].tanh();
  at::Tensor o = chunks[3].sigmoid();
  at::Tensor cy = f.mul(cx).add(i.mul(g));
  at::Tensor hy = o.mul(cy.tanh());
  at::Tensor workspace = at::cat({i, f, g, o}, 1);
  return {hy, cy, workspace};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fused_lstm_cell_backward_impl(
    const std::optional<at::Tensor>& grad_hy, const std::optional<at::Tensor>& grad_cy,
    const at::Tensor& cx, const at::Tensor& cy, const at::Tensor& workspace, bool has_bias) {
  bool has_hy = grad_hy && grad_hy->defined();
  bool has_cy = grad_cy && grad_cy->defined();
  if (!has_hy && !has_cy) return {at::Tensor(), at::Tensor(), at::Tensor()};
  auto gates = workspace.chunk(4, 1);
  const at::Tensor &i = gates[0], &f = gates[1], &g = gates[2], &o = gates[3];
  at::Tensor tanh_cy = cy.tanh();
  // d loss / d cy, through hy = o * tanh(cy) and directly.
  at::Tensor gcy = has_cy ? *grad_cy : at::zeros_like(cy);
  at::Tensor go;
  if (has_hy) {
    gcy = gcy.add(grad_hy->mul(o).mul(oneMinus(tanh_cy.mul(tanh_cy))));
    go = grad_hy->mul(tanh_cy).mul(o).mul(oneMinus(o));
  } else {
    go = at::zeros_like(o);
  }
  at::Tensor gi = gcy.mul(g).mul(i).mul(oneMinus(i));
  at::Tensor gf = gcy.mul(cx).mul(f).mul(oneMinus(f));
  at::Tensor gg = gcy.mul(i).mul(oneMinus(g.mul(g)));
  at::Tensor grad_gates = at::cat({gi, gf, gg, go}, 1);
  at::Tensor grad_cx = gcy.mul(f);
  at::Tensor grad_bias = has_bias ? grad_gates.sum(0) : at::Tensor();
  return {grad_gates, grad_cx, grad_bias};
}

std::tuple<at::Tensor, at::Tensor> fused_gru_cell(
    const at::Tensor& input_gates, const at::Tensor& hidden_gates, const at::Tensor& hx,
    const std::optional<at::Tensor>& input_bias, const std::optional<at::Tensor>& hidden_bias) {
  checkCellArgs("_thnn_fused_gru_cell", input_gates, hidden_gates, hx, 3);
  auto ig = withBias(input_gates, input_bias).chunk(3, 1);
  auto hg = withBias(hidden_gates, hidden_bias).chunk(3, 1);
  // The order of CPU's GRUCell: hidden part first in r and z.
  at::Tensor r = hg[0].add(ig[0]).sigmoid();
  at::Tensor z = hg[1].add(ig[1]).sigmoid();
  at::Tensor hn = hg[2];
  at::Tensor n = ig[2].add(hn.mul(r)).tanh();
  at::Tensor hy = hx.sub(n).mul(z).add(n);
  at::Tensor workspace = at::cat({r, z, n, hn, hx}, 1);
  return {hy, workspace};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> fused_gru_cell_backward(
    const at::Tensor& grad_hy, const at::Tensor& workspace, bool has_bias) {
  TORCH_CHECK(workspace.dim() == 2 && workspace.size(1) % 5 == 0,
              "_thnn_fused_gru_cell_backward: workspace of size ", workspace.sizes(),
              " is not N x 5H");
  auto w = workspace.chunk(5, 1);
  const at::Tensor &r = w[0], &z = w[1], &n = w[2], &hn = w[3], &hx = w[4];
  at::Tensor gz = grad_hy.mul(hx.sub(n)).mul(z).mul(oneMinus(z));
  at::Tensor gn = grad_hy.mul(oneMinus(z)).mul(oneMinus(n.mul(n)));
  at::Tensor gr = gn.mul(hn).mul(r).mul(oneMinus(r));
  at::Tensor grad_input_gates = at::cat({gr, gz, gn}, 1);
  at::Tensor grad_hidden_gates = at::cat({gr, gz, gn.mul(r)}, 1);
  at::Tensor grad_hx = grad_hy.mul(z);
  at::Tensor grad_input_bias, grad_hidden_bias;
  if (has_bias) {
    grad_input_bias = grad_input_gates.sum(0);
    grad_hidden_bias = grad_hidden_gates.sum(0);
  }
  return {grad_input_gates, grad_hidden_gates, grad_hx, grad_input_bias, grad_hidden_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(aten, PrivateUse1, m) {
  m.impl("_thnn_fused_lstm_cell", TORCH_FN(fused_lstm_cell));
  m.impl("_thnn_fused_lstm_cell_backward_impl", TORCH_FN(fused_lstm_cell_backward_impl));
  m.impl("_thnn_fused_gru_cell", TORCH_FN(fused_gru_cell));
  m.impl("_thnn_fused_gru_cell_backward", TORCH_FN(fused_gru_cell_backward));
}

}  // namespace torch_mps_ext
