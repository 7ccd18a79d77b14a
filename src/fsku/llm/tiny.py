"""Tiny causal LMs built from config on one locally trained byte-level BPE tokenizer, for tests and
the offline demo. Models built on the same tokenizer share a vocabulary (token-level distillation
between them works). They carry a ChatML template, like the Qwen models they stand in for."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Iterable, Optional

log = logging.getLogger(__name__)

CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def train_tokenizer(texts: Iterable[str], out_dir: Path, vocab_size: int = 2000):
    """A byte-level BPE tokenizer (digits split one per token, like Qwen's) saved as a fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(list(texts), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   additional_special_tokens=["<|im_start|>"])
    fast.chat_template = CHATML_TEMPLATE
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out_dir)
    return fast


def build_tiny_model(out_dir: str | Path, tokenizer_dir: str | Path, hidden: int = 64, layers: int = 2,
                     heads: int = 4, seed: int = 0, max_positions: int = 4096) -> Path:
    """A randomly initialised Qwen2 causal LM of the given size on the tokenizer in `tokenizer_dir`."""
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    out_dir, tokenizer_dir = Path(out_dir), Path(tokenizer_dir)
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 4, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=max(1, heads // 2),
                         max_position_embeddings=max_positions, tie_word_embeddings=True,
                         bos_token_id=None, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model = Qwen2ForCausalLM(config)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    (out_dir / "fsku_tiny.json").write_text(json.dumps({"hidden": hidden, "layers": layers, "heads": heads, "seed": seed,
                                                        "parameters": sum(p.numel() for p in model.parameters())}))
    return out_dir


def build_tiny_cross_encoder(out_dir: str | Path, tokenizer_dir: str | Path, hidden: int = 32, layers: int = 2,
                             heads: int = 2, seed: int = 0) -> Path:
    """A randomly initialised one-label BERT sequence classifier (what sentence-transformers' CrossEncoder
    loads as a reranker) on the tokenizer in `tokenizer_dir`."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    out_dir = Path(out_dir)
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 4, num_hidden_layers=layers,
                        num_attention_heads=heads, max_position_embeddings=1024, num_labels=1,
                        pad_token_id=tok.pad_token_id)
    model = BertForSequenceClassification(config)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return out_dir


def make_tiny_pair(out_dir: str | Path, texts: Optional[Iterable[str]] = None, vocab_size: int = 2000) -> dict[str, Path]:
    """A tiny teacher (~4 M parameters) and student (~0.5 M) sharing one tokenizer, under `out_dir`."""
    out_dir = Path(out_dir)
    if texts is None:
        texts = _default_texts()
    train_tokenizer(texts, out_dir / "tokenizer", vocab_size=vocab_size)
    teacher = build_tiny_model(out_dir / "teacher", out_dir / "tokenizer", hidden=192, layers=4, heads=6, seed=1)
    student = build_tiny_model(out_dir / "student", out_dir / "tokenizer", hidden=48, layers=2, heads=4, seed=2)
    return {"teacher": teacher, "student": student, "tokenizer": out_dir / "tokenizer"}


def _default_texts() -> list[str]:
    """Tokenizer training text: the project's own sample corpus and questions (Korean and English)
    and the synth_qa prompt templates, so the prompts the tiny teacher reads stay short."""
    root = Path(__file__).resolve().parents[3] / "data"
    texts = []
    templates = Path(__file__).resolve().parents[1] / "synth" / "templates"
    for path in sorted(list(root.rglob("*")) + list(templates.glob("*.yaml"))):
        if path.suffix in {".md", ".txt", ".csv", ".jsonl", ".yaml"} and path.is_file():
            try:
                texts.append(path.read_text(encoding="utf-8"))
            except UnicodeDecodeError:
                continue
    if not texts:
        texts = ["전자금융거래 정보보호 1 2 3 4 5 정답 question answer"]
    return texts


def train_on_examples(model_dir: str | Path, examples: list[tuple[list[dict], str]], steps: int = 300, lr: float = 3e-3,
                      batch_size: int = 8, max_len: int = 1024, seed: int = 0, progress: bool = False) -> dict:
    """Supervised fine-tuning of a (tiny) chat model in place: loss on the response tokens only.

    `examples` are (chat messages, response text). Used to teach the tiny offline teacher the
    synth_qa output format; examples longer than max_len tokens are skipped. Returns steps, examples,
    first/final loss and the loss of every step (`losses`, plotted by synth_qa's run)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = Path(model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    encoded = []
    for messages, response in examples:
        prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
        r_ids = tok(response + "<|im_end|>", add_special_tokens=False)["input_ids"]
        if len(p_ids) + len(r_ids) <= max_len:
            encoded.append((p_ids + r_ids, [-100] * len(p_ids) + r_ids))
    if not encoded:
        raise ValueError(f"no training example fits in {max_len} tokens")
    torch.manual_seed(seed)
    rng = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20) * max(0.05, 1 - s / steps))
    model.train()
    losses = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, desc="tiny teacher SFT", unit="step")
    for step in range(steps):
        idx = torch.randint(len(encoded), (min(batch_size, len(encoded)),), generator=rng).tolist()
        width = max(len(encoded[i][0]) for i in idx)
        ids = torch.full((len(idx), width), tok.pad_token_id, dtype=torch.long)
        labels = torch.full((len(idx), width), -100, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):
            x, y = encoded[i]
            ids[row, :len(x)] = torch.tensor(x)
            labels[row, :len(y)] = torch.tensor(y)
            mask[row, :len(x)] = 1
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if bar:
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    if bar:
        bar.close()
    model.eval()
    model.save_pretrained(model_dir)
    info = {"steps": steps, "examples": len(encoded), "first_loss": losses[0],
            "final_loss": sum(losses[-10:]) / len(losses[-10:]), "losses": [round(x, 4) for x in losses]}
    log.info("trained %s on %d examples: loss %.3f -> %.3f", model_dir, len(encoded), info["first_loss"], info["final_loss"])
    return info
