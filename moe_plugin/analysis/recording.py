"""See what the MoE layers of a model decided, without changing the layers.

Everything here works from the outside: forward hooks on the MoE layers and
their routers, the dispatchers the routers return and the layers'
``moe_metrics``. Nothing is recorded, and nothing costs, unless a
:class:`RoutingRecorder` is active.

- :class:`~moe_plugin.layers.SparseMoE` (token choice): the router's forward
  hook sees the grouped tokens and the dispatcher it returned; the layer
  says which arguments it routed them with (``K``, capacity, BPR,
  renormalise: :meth:`~moe_plugin.layers.SparseMoE.router_arguments`). The
  assignment is recomputed from the router's clean gates (and its selection
  bias, with auxiliary-loss-free balancing) with
  :func:`~moe_plugin.layers.assign_top_k` (so that the expert a *dropped*
  choice wanted is known) and checked against the dispatcher's ``kept``;
  the capacity is the dispatcher's (a dropless layer's varies by batch).
- :class:`~moe_plugin.layers.SparseMoE` (expert choice): the dispatcher's
  ``slot_token`` and ``slot_weights`` say which expert took which token.
- :class:`~moe_plugin.layers.SoftMoE`, :class:`~moe_plugin.layers.SpheroMoE`:
  their dispatch and combine weights play the router's part; they are
  recomputed from the layer's input with the layer's own
  ``routing_weights`` (deterministic in evaluation mode).
"""
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moe_plugin.layers import MoELayer, SparseMoE, assign_top_k
from moe_plugin.layers.routing import dispatcher_capacity

#: The MoE layers whose routing can be recorded: those of
#: :mod:`moe_plugin.layers` (SparseMoE by its router, the soft layers by
#: their ``routing_weights``).
RECORDABLE = MoELayer


def find_moe_layers(model: nn.Module) -> Dict[str, nn.Module]:
    """Every MoE layer of ``model`` by short name, in module order.

    The short name is the module name without a leading ``backbone.`` (as
    :class:`~moe_plugin.models.MoEImageClassifier` logs it), e.g.
    ``layers.1.ffn`` or ``neck.blocks.0.moe``.

    Args:
        model (nn.Module): any model (a DDP wrapper's ``module`` is used).

    Returns:
        dict[str, nn.Module]: name -> layer.
    """
    model = getattr(model, 'module', model)
    layers = {}
    for name, module in model.named_modules():
        if isinstance(module, RECORDABLE):
            short = name[len('backbone.'):] if name.startswith(
                'backbone.') else name
            layers[short] = module
    return layers


def select_moe_layers(model: nn.Module,
                      selection: Optional[Sequence] = None
                      ) -> Dict[str, nn.Module]:
    """The MoE layers named by ``selection`` (all of them for None).

    Args:
        model (nn.Module): the model.
        selection (Sequence, optional): short layer names (see
            :func:`find_moe_layers`) or, for a backbone with ``moe_layers``
            (``VisionMoE``), block indices (ints or digit strings).

    Returns:
        dict[str, nn.Module]: name -> layer, in the order given.
    """
    layers = find_moe_layers(model)
    if not layers:
        raise ValueError(
            f'{type(getattr(model, "module", model)).__name__} has no MoE '
            f'layer (a moe_plugin.layers.{RECORDABLE.__name__})')
    if not selection:
        return layers
    model = getattr(model, 'module', model)
    backbone = getattr(model, 'backbone', model)
    blocks = tuple(getattr(backbone, 'moe_layers', ()) or ())
    chosen = {}
    for item in selection:
        text = str(item)
        if text.isdigit():
            index = int(text)
            if index not in blocks:
                raise ValueError(
                    f'layer {index} is not an MoE layer: the MoE blocks are '
                    f'{list(blocks)} ({", ".join(layers)})'
                    if blocks else
                    f'layer {index}: this model has no block-indexed MoE '
                    f'layers; give layer names, one of {list(layers)}')
            text = f'layers.{index}.ffn'
        if text not in layers:
            raise ValueError(f'{text!r} is not an MoE layer; the MoE layers '
                             f'are {list(layers)}')
        chosen[text] = layers[text]
    return chosen


@dataclass
class LayerRouting:
    """What one MoE layer did with one batch (evaluation mode).

    ``B`` images of ``N`` tokens, ``E`` experts. All tensors are detached
    and on the layer's device.

    Attributes:
        kind (str): 'token_choice', 'expert_choice' or 'soft'.
        probs (Tensor): ``[B, N, E]`` the clean routing distribution of each
            token: the router's softmax gates (sparse), or the share of the
            token's combine weight on each expert's slots (soft).
        weights (Tensor): ``[B, N, E]`` the weight with which expert ``e``'s
            output enters token ``n``; 0 where ``e`` did not process it.
            Equals ``probs`` for soft layers.
        taken (Tensor, optional): ``[B, N, E]`` bool, expert ``e`` processed
            token ``n`` (sparse layers).
        dropped (Tensor, optional): ``[B, N, E]`` bool, token ``n`` chose
            ``e`` but ``e``'s buffer was full (token choice).
        dispatch (Tensor, optional): ``[B, N, E]`` share of expert ``e``'s
            slot inputs that came from token ``n`` (soft layers; each
            image's column sums to the slots per expert).
        processed (int): (token, choice) pairs processed: kept choices
            (token choice), tokens taken by at least one expert (expert
            choice), all tokens (soft).
        pairs (int): (token, choice) pairs: ``B * N * K`` (token choice),
            ``B * N`` (expert choice, soft).
    """
    kind: str
    probs: Tensor
    weights: Tensor
    taken: Optional[Tensor] = None
    dropped: Optional[Tensor] = None
    dispatch: Optional[Tensor] = None
    processed: int = 0
    pairs: int = 0


def sparse_gates(layer: SparseMoE, x: Tensor) -> Tensor:
    """Clean softmax gates ``[..., E]`` of a sparse layer's router.

    The router's clean logits (no noise), so that the gates of a token do
    not depend on how the tokens are grouped.
    """
    return layer.router.logits(x).softmax(-1)


def soft_routing(layer: nn.Module, x: Tensor):
    """Noise-free dispatch and combine weights of a soft layer, per expert.

    Args:
        layer (SoftMoE | SpheroMoE): the layer.
        x (Tensor): ``[B, N, D]`` its input.

    Returns:
        tuple: ``dispatch [B, N, E]`` and ``combine [B, N, E]``, each summed
        over an expert's slots.
    """
    training = layer.training
    layer.training = False  # SpheroMoE draws noise in training only.
    try:
        dispatch, combine = layer.routing_weights(x)
    finally:
        layer.training = training
    images, tokens = x.shape[:2]
    return (dispatch.sum(-1),
            combine.reshape(images, tokens, layer.num_experts, -1).sum(-1))


def clean_routing_probs(layer: nn.Module, x: Tensor) -> Tensor:
    """The clean routing distribution ``[B, N, E]`` of a layer's tokens.

    Args:
        layer (nn.Module): a SparseMoE, SoftMoE or SpheroMoE.
        x (Tensor): ``[B, N, D]`` the layer's input.

    Returns:
        Tensor: sums to 1 over the experts.
    """
    if isinstance(layer, SparseMoE):
        return sparse_gates(layer, x)
    return soft_routing(layer, x)[1]


def router_entropy(probs: Tensor) -> Tensor:
    """Mean over tokens of ``-sum_e p log p`` (nats); ``log E`` at most."""
    return -(probs * probs.clamp_min(1e-12).log()).sum(-1).mean()


def _one_hot_any(index: Tensor, mask: Tensor, num_experts: int) -> Tensor:
    """``[M, K]`` experts and mask -> ``[M, E]`` bool: any masked choice."""
    hits = F.one_hot(index, num_experts).bool() & mask.unsqueeze(-1)
    return hits.any(1)


class RoutingRecorder:
    """Record the routing of MoE layers in evaluation forward passes.

    A context manager: inside it every forward of the model stores, per
    layer, a :class:`LayerRouting` in :attr:`last` (the previous batch's
    are replaced, so memory does not grow with the data set).

    Args:
        model (nn.Module): the model, in evaluation mode.
        layers (dict, optional): name -> layer to record, e.g. from
            :func:`select_moe_layers`. Defaults to every MoE layer.

    Examples:
        >>> with RoutingRecorder(model) as recorder:
        ...     model(images)
        ...     routing = recorder.last['layers.1.ffn']
    """

    def __init__(self, model: nn.Module,
                 layers: Optional[Dict[str, nn.Module]] = None):
        self.layers = find_moe_layers(model) if layers is None else layers
        if not self.layers:
            raise ValueError(
                f'{type(model).__name__} has no MoE layer to record')
        self.last: Dict[str, LayerRouting] = {}
        self._handles: List = []
        self._inputs: Dict[str, Tensor] = {}

    def __enter__(self):
        for name, layer in self.layers.items():
            self._handles.append(
                layer.register_forward_pre_hook(self._pre_hook(name)))
            if isinstance(layer, SparseMoE):
                self._handles.append(
                    layer.router.register_forward_hook(
                        self._router_hook(name, layer)))
            else:
                self._handles.append(
                    layer.register_forward_hook(self._soft_hook(name)))
        return self

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._inputs = {}

    def _pre_hook(self, name):

        def hook(layer, args):
            if layer.training:
                raise RuntimeError(
                    f'RoutingRecorder records evaluation passes, but MoE '
                    f'layer {name} is in training mode; call model.eval()')
            self._inputs[name] = args[0]

        return hook

    def _router_hook(self, name, layer):

        def hook(router, args, output):
            x = self._inputs[name]
            with torch.no_grad():
                self.last[name] = self._sparse_record(
                    layer, args[0], output[0], x.shape[:2])

        return hook

    def _sparse_record(self, layer, groups, dispatcher, shape):
        images, tokens = shape
        arguments = layer.router_arguments(groups.shape[1])
        gates = sparse_gates(layer, groups)
        num_experts = gates.shape[-1]
        if 'top_k' in arguments:
            # A dropless layer's capacity is the one its dispatcher has (no
            # second collective under expert parallelism); a balancing
            # router's bias chooses the experts as in its forward.
            assignment = assign_top_k(
                gates, arguments['top_k'],
                dispatcher_capacity(dispatcher, groups.shape[0]),
                arguments['batch_priority'], arguments['renormalize'],
                selection_bias=getattr(layer.router, 'selection_bias', None))
            top_k = assignment.expert_index.shape[-1]
            index = assignment.expert_index.reshape(-1, top_k)
            kept = assignment.kept.reshape(-1, top_k)
            recorded = getattr(dispatcher, 'kept', None)
            if recorded is not None and not torch.equal(
                    kept, recorded.reshape(-1, top_k)):
                raise RuntimeError(
                    f'the recomputed routing of {layer.router_type} layer '
                    'disagrees with its dispatcher: the router no longer '
                    'uses assign_top_k on its clean gates')
            weights = (F.one_hot(index, num_experts).to(gates.dtype) *
                       (assignment.weights.reshape(-1, top_k) *
                        kept).unsqueeze(-1)).sum(1)
            taken = _one_hot_any(index, kept, num_experts)
            dropped = _one_hot_any(index, ~kept, num_experts)
            processed, pairs = int(kept.sum()), kept.numel()
            kind = 'token_choice'
        else:
            num_tokens = gates.shape[0] * gates.shape[1]
            slot_token = dispatcher.slot_token
            expert = torch.arange(
                num_experts, device=slot_token.device).view(-1, 1).expand_as(
                    slot_token)
            weights = gates.new_zeros(num_tokens, num_experts).index_put_(
                (slot_token.reshape(-1), expert.reshape(-1)),
                dispatcher.slot_weights.reshape(-1).to(gates.dtype),
                accumulate=True)
            taken = torch.zeros(
                num_tokens, num_experts, dtype=torch.bool,
                device=gates.device).index_put_(
                    (slot_token.reshape(-1), expert.reshape(-1)),
                    torch.ones((), dtype=torch.bool, device=gates.device))
            dropped = None
            processed, pairs = int(taken.any(-1).sum()), num_tokens
            kind = 'expert_choice'
        view = (images, tokens, num_experts)
        return LayerRouting(
            kind=kind,
            probs=gates.reshape(view),
            weights=weights.reshape(view),
            taken=taken.reshape(view),
            dropped=None if dropped is None else dropped.reshape(view),
            processed=processed,
            pairs=pairs)

    def _soft_hook(self, name):

        def hook(layer, args, output):
            with torch.no_grad():
                dispatch, combine = soft_routing(layer, args[0])
            images, tokens = args[0].shape[:2]
            self.last[name] = LayerRouting(
                kind='soft',
                probs=combine,
                weights=combine,
                dispatch=dispatch,
                processed=images * tokens,
                pairs=images * tokens)

        return hook
