"""Classification by label likelihood: pick the option whose target is most probable.

For every prompt and every option the score is ``log p(target | prompt)`` where the target is
encoded exactly as in training (:func:`aimm.encoding.encode_targets`): decoder-only
``" " + label + EOS`` after the prompt, seq2seq ``label + EOS`` as decoder labels. The prediction
is the argmax (ties -> the earlier option).

Length normalisation (``length_normalize``): False (default) sums the token log-probs, i.e. the
log-likelihood of the whole target, which is what training maximises and what the greedy
decoder approximates; True divides by the number of target tokens (EOS included), which removes
the bias of the sum towards labels with fewer tokens (e.g. ``Album`` vs ``Mean of
Transportation``) but is no longer a probability.

Batching: ``batch_size`` prompts form a group and every (prompt, option) pair of the group is
scored without running a prompt twice. Decoder-only ``strategy``:

* ``"packed"`` (default): ONE forward per group. Each row is the left-padded prompt followed by
  all options' tokens back to back; a custom 4-D attention mask lets each option see the prompt
  and its own earlier tokens only, and its position ids restart after the prompt, so every
  option is scored exactly as if it followed the prompt alone. Costs the prompt tokens plus the
  option tokens; needs a model that honours a 4-D float mask and explicit position ids
  (LLaMA/Qwen/Mistral/SmolLM families in transformers 5 do with the sdpa and eager attention,
  and with aimm's float32 sdpa of ``attention_dtype``;
  the tests check it against a brute-force loss). Other attention kernels fall back to "cache".
* ``"cache"``: the prompts are run once with a KV cache, the cache is repeated once per option
  (``batch_size * len(options) * prompt_len`` cached positions: memory-hungry) and only the option
  tokens are fed.
* ``"full"``: one right-padded row per full ``prompt + option`` pair (``len(options)`` times the
  prompt compute); the simplest path, works with any causal LM.

Seq2seq: the encoder runs once per prompt; its states are repeated per option for the decoder
(``strategy`` is ignored).

A PEFT prompt-tuning model (``progprompt``: virtual tokens prepended to every input) is scored as
its own forward scores it, with positions ``0..v-1`` for the ``v`` virtual tokens and the text
after them: ``"packed"`` feeds ``[virtual | prompt | options]`` as input embeddings to the base
model (the soft prompt from PEFT's ``get_prompt``, the rest from its word embeddings), with the
block mask extended so that every row sees the virtual tokens; ``"cache"`` and ``"full"`` run
PEFT's forward on one right-padded row per (prompt, option) pair, the virtual positions' logits
dropped. Seq2seq runs the encoder once per prompt on ``[virtual | prompt]``. Other
prompt-learning types (prefix tuning, ...) take the ``"full"`` path.
"""

from __future__ import annotations

import inspect
from typing import Sequence

import torch

from aimm.attention import honours_4d_mask
from aimm.encoding import TruncationCounter, encode_prompts, encode_targets, pad_batch
from aimm.loss import last_positions

from ._util import check_nonempty, inference, length_sorted_batches, model_device, progress_bar

_NO_CUT = 1 << 30
STRATEGIES = ("packed", "cache", "full")


def _option_targets(tokenizer, options: Sequence[str], is_seq2seq: bool) -> list[list[int]]:
    options = [str(o) for o in options]
    if not options:
        raise ValueError("label scoring needs at least one option")
    if len(set(options)) != len(options):
        raise ValueError(f"duplicate options: {options}")
    return encode_targets(tokenizer, options, is_seq2seq=is_seq2seq, max_target_len=_NO_CUT)


def _token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[tokens] without materialising the full log-softmax."""
    logits = logits.float()
    picked = logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def _forward_params(model) -> set[str]:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        return set(inspect.signature(base.forward).parameters)
    except (TypeError, ValueError):
        return set()


def _tail_logits_only(model, k: int, device) -> dict:
    """Forward kwargs for the logits of the last ``k`` positions only (none if the model's forward
    takes no ``logits_to_keep``)."""
    return {"logits_to_keep": last_positions(k, device)} \
        if "logits_to_keep" in _forward_params(model) else {}


def _virtual_tokens(model) -> int:
    """How many virtual tokens a PEFT prompt-learning model prepends to every input (0: none)."""
    config = getattr(model, "active_peft_config", None)
    return int(config.num_virtual_tokens) if getattr(config, "is_prompt_learning", False) else 0


def _prompt_tuning(model) -> bool:
    """A PEFT prompt-tuning model: its forward prepends ``get_prompt()`` to the input embeddings
    (and nothing else), so a caller may do the same and call the base model itself."""
    config = getattr(model, "active_peft_config", None)
    kind = getattr(config, "peft_type", None)
    return getattr(kind, "value", kind) == "PROMPT_TUNING" and hasattr(model, "get_prompt") \
        and getattr(config, "num_transformer_submodules", 1) in (1, None)


def _with_soft_prompt(model, ids: torch.Tensor) -> torch.Tensor:
    """``[get_prompt() | word embeddings of ids]``: the input embeddings PEFT's prompt-tuning
    forward builds (the prompt cast to the embeddings' dtype, as PEFT does)."""
    base = model.get_base_model()
    embeds = base.get_input_embeddings()(ids)
    prompt = model.get_prompt(batch_size=ids.shape[0]).to(device=embeds.device, dtype=embeds.dtype)
    return torch.cat([prompt, embeds], dim=1)


def _cache_keyword(model) -> str:
    """``cache`` (transformers >= 5.2x) or the older ``past_key_values`` forward argument."""
    return "cache" if "cache" in _forward_params(model) else "past_key_values"


def _output_cache(out):
    keys = out.keys() if hasattr(out, "keys") else ()
    for key in ("cache", "past_key_values"):
        if key in keys:
            return out[key]
    return None


def _pad_targets(targets: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    return pad_batch(targets, pad_id, left=False)


def _decoder_shared(model, prompts, targets, pad_id, device) -> torch.Tensor | None:
    """(B, K) summed log-probs via one prompt pass + cache repeated per option; None if the
    model's cache cannot be repeated."""
    b, k = len(prompts), len(targets)
    p_ids, p_mask = pad_batch(prompts, pad_id, left=True)
    p_pos = (p_mask.cumsum(-1) - 1).clamp(min=0)
    # only the last position's logits are needed from the prompt pass
    keep = _tail_logits_only(model, 1, device)
    out = model(
        input_ids=p_ids.to(device),
        attention_mask=p_mask.to(device),
        position_ids=p_pos.to(device),
        use_cache=True,
        **keep,
    )
    cache = _output_cache(out)
    if cache is None or not hasattr(cache, "batch_repeat_interleave"):
        return None
    first = torch.tensor([t[0] for t in targets], device=device)  # (K,)
    # left padding: the last column holds every prompt's last token
    total = torch.log_softmax(out.logits[:, -1, :].float(), dim=-1)[:, first]  # (B, K)
    inputs = [t[:-1] for t in targets]  # feed all but the last token (EOS) ...
    if max(len(x) for x in inputs) == 0:
        return total
    t_ids, t_mask = _pad_targets(inputs, pad_id)  # (K, Lt)
    nxt, _ = _pad_targets([t[1:] for t in targets], pad_id)  # ... to predict tokens 1..
    cache.batch_repeat_interleave(k)
    lens = p_mask.sum(-1)  # (B,)
    pos = lens.repeat_interleave(k)[:, None] + torch.arange(t_ids.shape[1])[None, :]
    mask = torch.cat([p_mask.repeat_interleave(k, 0), t_mask.repeat(b, 1)], dim=1)
    out2 = model(
        input_ids=t_ids.repeat(b, 1).to(device),
        attention_mask=mask.to(device),
        position_ids=pos.to(device),
        use_cache=True,
        **{_cache_keyword(model): cache},
    )
    lp = _token_logprobs(out2.logits, nxt.repeat(b, 1).to(device))  # (B*K, Lt)
    lp = (lp * t_mask.repeat(b, 1).to(device)).sum(-1).view(b, k)
    return total + lp


def _decoder_packed(model, prompts, targets, pad_id, device, virtual: int = 0) -> torch.Tensor:
    """(B, K) summed log-probs, one forward: [prompt | opt_1 | ... | opt_K] per row with a
    block mask (each option sees the prompt and itself) and per-option position ids.
    ``virtual`` > 0 (a prompt-tuning model): the row starts with its ``virtual`` soft-prompt
    positions (0..virtual-1, seen by every later position), the text's positions follow them."""
    b, k = len(prompts), len(targets)
    p_ids, p_mask = pad_batch(prompts, pad_id, left=True)  # (B, Lp)
    head = virtual + p_ids.shape[1]  # the prompt ends at column head-1
    feeds = [t[:-1] for t in targets]  # option k feeds all its tokens but the last (EOS)
    starts, offset = [], head
    for f in feeds:
        starts.append(offset)
        offset += len(f)
    width = offset
    opt_ids = torch.tensor([tok for f in feeds for tok in f], dtype=torch.long)
    ids = torch.cat([p_ids, opt_ids.expand(b, -1)], dim=1)  # every column after the soft prompt

    lens = p_mask.sum(-1)  # (B,)
    seen = torch.cat([torch.ones((b, virtual), dtype=torch.bool), p_mask.bool()], dim=1)  # (B, head)
    pos = torch.zeros((b, width), dtype=torch.long)
    pos[:, :virtual] = torch.arange(virtual)
    pos[:, virtual:head] = virtual + (p_mask.cumsum(-1) - 1).clamp(min=0)
    allowed = torch.zeros((b, width, width), dtype=torch.bool)
    causal = torch.ones((head, head), dtype=torch.bool).tril()
    allowed[:, :head, :head] = causal & seen[:, None, :]
    for f, st in zip(feeds, starts):
        n = len(f)
        if n == 0:
            continue
        pos[:, st : st + n] = virtual + lens[:, None] + torch.arange(n)[None, :]
        allowed[:, st : st + n, :head] = seen[:, None, :]
        allowed[:, st : st + n, st : st + n] = torch.ones((n, n), dtype=torch.bool).tril()
    # rows of left padding see themselves, so no softmax row is empty
    idx = torch.arange(head)
    allowed[:, idx, idx] = True
    base = model.get_base_model() if virtual else model
    dtype = next(base.parameters()).dtype
    mask = torch.zeros((b, 1, width, width), dtype=dtype)
    mask.masked_fill_(~allowed[:, None], torch.finfo(dtype).min)

    keep = width - head + 1  # logits from the prompt's last column on
    extra = _tail_logits_only(model, keep, device)
    text = {"inputs_embeds": _with_soft_prompt(model, ids.to(device))} if virtual else \
        {"input_ids": ids.to(device)}
    logits = base(
        **text,
        attention_mask=mask.to(device),
        position_ids=pos.to(device),
        use_cache=False,
        **extra,
    ).logits[:, -keep:, :]  # column c <-> sequence position head - 1 + c

    # token j of option k is predicted at position (head-1 if j == 0 else starts[k] + j - 1)
    cols, toks, owner = [], [], []
    for kk, (t, st) in enumerate(zip(targets, starts)):
        for j, tok in enumerate(t):
            cols.append(0 if j == 0 else st + j - head)
            toks.append(tok)
            owner.append(kk)
    picked = logits[:, torch.tensor(cols, device=device), :]  # (B, N, V)
    lp = _token_logprobs(picked, torch.tensor(toks, device=device).expand(b, -1))  # (B, N)
    out = torch.zeros((b, k), dtype=lp.dtype, device=device)
    out.index_add_(1, torch.tensor(owner, device=device), lp)
    return out


def _decoder_full(model, prompts, targets, pad_id, device, virtual: int = 0) -> torch.Tensor:
    """(B, K) summed log-probs, one right-padded row per (prompt, option) pair; the logits of
    ``virtual`` prepended prompt-tuning positions are dropped."""
    b, k = len(prompts), len(targets)
    rows = [p + t for p in prompts for t in targets]
    ids, mask = pad_batch(rows, pad_id, left=False)
    logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits[:, virtual:]
    width = max(len(t) for t in targets)
    gather_pos = torch.zeros((b * k, width), dtype=torch.long)
    tokens = torch.full((b * k, width), pad_id, dtype=torch.long)
    valid = torch.zeros((b * k, width))
    for r, (p, t) in enumerate((p, t) for p in prompts for t in targets):
        n = len(t)
        gather_pos[r, :n] = torch.arange(len(p) - 1, len(p) - 1 + n)
        tokens[r, :n] = torch.tensor(t)
        valid[r, :n] = 1
    picked = logits.gather(1, gather_pos.to(device)[..., None].expand(-1, -1, logits.shape[-1]))
    lp = _token_logprobs(picked, tokens.to(device)) * valid.to(device)
    return lp.sum(-1).view(b, k)


def _seq2seq(model, prompts, targets, pad_id, device) -> torch.Tensor:
    from transformers.modeling_outputs import BaseModelOutput

    b, k = len(prompts), len(targets)
    e_ids, e_mask = pad_batch(prompts, pad_id, left=False)
    e_ids, e_mask = e_ids.to(device), e_mask.to(device)
    forward = model
    if _prompt_tuning(model):  # the soft prompt before the encoder's input, as PEFT's forward
        forward = model.get_base_model()
        e_mask = torch.cat([torch.ones((b, _virtual_tokens(model)), dtype=e_mask.dtype,
                                       device=device), e_mask], dim=1)
        hidden = forward.get_encoder()(inputs_embeds=_with_soft_prompt(model, e_ids),
                                       attention_mask=e_mask).last_hidden_state
        encoder = {"encoder_outputs": BaseModelOutput(last_hidden_state=hidden.repeat_interleave(k, 0))}
    elif _virtual_tokens(model):  # another prompt-learning type: its own forward, per option
        encoder = {"input_ids": e_ids.repeat_interleave(k, 0)}
    else:
        hidden = model.get_encoder()(input_ids=e_ids, attention_mask=e_mask).last_hidden_state
        encoder = {"encoder_outputs": BaseModelOutput(last_hidden_state=hidden.repeat_interleave(k, 0))}
    start = getattr(model.config, "decoder_start_token_id", None)
    start = pad_id if start is None else start
    labels, l_mask = _pad_targets(targets, pad_id)  # (K, Lt)
    dec_in, _ = _pad_targets([[start] + t[:-1] for t in targets], pad_id)
    out = forward(
        **encoder,
        attention_mask=e_mask.repeat_interleave(k, 0),
        decoder_input_ids=dec_in.repeat(b, 1).to(device),
        use_cache=False,
    )
    lp = _token_logprobs(out.logits, labels.repeat(b, 1).to(device))
    return (lp * l_mask.repeat(b, 1).to(device)).sum(-1).view(b, k)


def label_logprobs(
    model: torch.nn.Module,
    tokenizer,
    prompts: Sequence[str],
    options: Sequence[str],
    *,
    is_seq2seq: bool,
    batch_size: int = 8,
    max_input_len: int | None = 512,
    length_normalize: bool = False,
    strategy: str = "packed",
    progress: bool | str = False,
    counter: TruncationCounter | None = None,
    truncation: str = "release",
) -> list[list[float]]:
    """``scores[n][k]`` = log p(option k | prompt n), summed over the option's tokens (EOS
    included), or averaged per token with ``length_normalize=True``. Eval mode, inference mode;
    the model's train/eval flags are restored afterwards."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    prompts = list(prompts)
    targets = _option_targets(tokenizer, options, is_seq2seq)
    if not prompts:
        return []
    encoded = encode_prompts(
        tokenizer, prompts, is_seq2seq=is_seq2seq, max_input_len=max_input_len, counter=counter,
        truncation=truncation,
    )
    check_nonempty(encoded, is_seq2seq)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = model_device(model)
    lengths = torch.tensor([len(t) for t in targets], dtype=torch.float64)
    virtual = _virtual_tokens(model)
    result: list[list[float] | None] = [None] * len(prompts)
    bar = progress_bar(len(prompts), progress, unit="ex")
    try:
        with inference(model):
            for idx in length_sorted_batches([len(e) for e in encoded], batch_size):
                group = [encoded[i] for i in idx]
                if is_seq2seq:
                    scores = _seq2seq(model, group, targets, pad_id, device)
                else:
                    scores = None
                    packed = strategy == "packed" and honours_4d_mask(model)
                    if virtual and packed and _prompt_tuning(model):
                        scores = _decoder_packed(model, group, targets, pad_id, device, virtual)
                    elif virtual:  # a prompt is prepended by the model's forward (2-D masks only)
                        pass
                    elif packed:
                        scores = _decoder_packed(model, group, targets, pad_id, device)
                    elif strategy in ("packed", "cache"):
                        scores = _decoder_shared(model, group, targets, pad_id, device)
                    if scores is None:  # "full", a cache that cannot be repeated, a prompt
                        scores = _decoder_full(model, group, targets, pad_id, device, virtual)
                scores = scores.double().cpu()
                if length_normalize:
                    scores = scores / lengths
                for i, row in zip(idx, scores.tolist()):
                    result[i] = row
                if bar is not None:
                    bar.update(len(idx))
    finally:
        if bar is not None:
            bar.close()
    return result  # type: ignore[return-value]


def label_scores(
    model: torch.nn.Module,
    tokenizer,
    prompts: Sequence[str],
    options: Sequence[str],
    *,
    is_seq2seq: bool,
    batch_size: int = 8,
    max_input_len: int | None = 512,
    length_normalize: bool = False,
    strategy: str = "packed",
    progress: bool | str = False,
    counter: TruncationCounter | None = None,
    truncation: str = "release",
) -> list[str]:
    """The most likely option for each prompt (see :func:`label_logprobs`)."""
    options = [str(o) for o in options]
    table = label_logprobs(
        model,
        tokenizer,
        prompts,
        options,
        is_seq2seq=is_seq2seq,
        batch_size=batch_size,
        max_input_len=max_input_len,
        length_normalize=length_normalize,
        strategy=strategy,
        progress=progress,
        counter=counter,
        truncation=truncation,
    )
    return [options[max(range(len(row)), key=row.__getitem__)] for row in table]
