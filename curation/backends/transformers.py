"""The `transformers` backend: plain transformers; the reference the vLLM backend is tested against (fp32
perplexities agree to 1e-2 relative)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from curation.backends.base import Backend, BackendSettings, Generation, HFTokenizerMixin, model_folder, prompt_seed

logger = logging.getLogger(__name__)

class TransformersBackend(HFTokenizerMixin, Backend):
    kind = "transformers"

    def __init__(self, model: str | Path, settings: BackendSettings | None = None):
        super().__init__(model, settings)
        self.path = model_folder(model)
        self._load_tokenizer()

    @property
    def hf_model(self):
        def build(dtype):
            from transformers import AutoModelForCausalLM

            return AutoModelForCausalLM.from_pretrained(self.path, dtype=dtype).eval()

        return self._loaded(build)

    def _batches(self, n: int, lengths: list[int]) -> Iterator[list[int]]:
        """Index batches of similar length (longest first), at most micro_batch_size rows each."""
        order = sorted(range(n), key=lambda i: -lengths[i])
        bs = self.settings.micro_batch_size
        for start in range(0, n, bs):
            yield order[start : start + bs]

    def _inputs(self, seqs: list[list[int]]):
        import torch

        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), self.eos_token_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = torch.tensor(s)
            mask[i, : len(s)] = 1
        return ids, mask

    def _hidden(self, seqs: list[list[int]]):
        """Last hidden states (batch, width, hidden) of right-padded `seqs`: the base model without its LM head."""
        import torch

        ids, mask = self._inputs(seqs)
        with torch.inference_mode():
            return self.hf_model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state

    def _logprobs(self, hidden, ctx: list[int], cont: list[int]) -> list[float]:
        """log p(cont | ctx) per continuation token from one row's hidden states. The LM head runs on the
        continuation positions only (a context's logits are never needed), with the final-logit scaling and
        soft-capping some model families apply in their forward."""
        import torch

        start = len(ctx) - 1  # position t predicts token t+1
        with torch.inference_mode():
            logits = self.hf_model.get_output_embeddings()(hidden[start : start + len(cont)]).float()
            config = self.hf_model.config
            if getattr(config, "logit_scale", None):
                logits = logits * config.logit_scale
            if getattr(config, "final_logit_softcapping", None):
                logits = torch.tanh(logits / config.final_logit_softcapping) * config.final_logit_softcapping
            lp = torch.log_softmax(logits, dim=-1)
            return lp.gather(-1, torch.tensor(cont)[:, None])[:, 0].tolist()

    def _loglikelihood(self, requests):
        seqs = [c + x for c, x in requests]
        result: list[list[float]] = [[] for _ in requests]
        for batch in self._batches(len(seqs), [len(s) for s in seqs]):
            hidden = self._hidden([seqs[i] for i in batch])
            for row, i in enumerate(batch):
                result[i] = self._logprobs(hidden[row], *requests[i])
        return result

    def _loglikelihood_and_embed(self, requests, max_tokens):
        """One forward per batch: continuation logprobs and the embedding from the same hidden states."""
        seqs = [c + x for c, x in requests]
        lls: list[list[float]] = [[] for _ in requests]
        vecs: list[np.ndarray | None] = [None] * len(requests)
        for batch in self._batches(len(seqs), [len(s) for s in seqs]):
            hidden = self._hidden([seqs[i] for i in batch])
            for row, i in enumerate(batch):
                ctx, cont = requests[i]
                lls[i] = self._logprobs(hidden[row], ctx, cont)
                vecs[i] = hidden[row, len(ctx) : len(ctx) + min(len(cont), max_tokens)].float().mean(0).numpy()
        return lls, np.stack(vecs)

    def _embed(self, texts, max_tokens):
        """Hidden states only (no LM head): cheaper than a scoring pass."""
        seqs = [[self.eos_token_id] + (self.encode(t)[:max_tokens] or [self.eos_token_id]) for t in texts]
        vecs: list[np.ndarray | None] = [None] * len(seqs)
        for batch in self._batches(len(seqs), [len(s) for s in seqs]):
            hidden = self._hidden([seqs[i] for i in batch])
            for row, i in enumerate(batch):
                vecs[i] = hidden[row, 1 : len(seqs[i])].float().mean(0).numpy()
        return np.stack(vecs)

    def _generate(self, prompts, sampling):
        import torch
        from transformers import GenerationConfig

        result = []
        for p in prompts:
            seed = prompt_seed(sampling.seed, p)
            greedy = sampling.temperature == 0
            config = GenerationConfig(  # exactly the configured sampling, not the model folder's defaults
                do_sample=not greedy, num_return_sequences=sampling.n, max_new_tokens=sampling.max_tokens,
                eos_token_id=self.eos_token_id, pad_token_id=self.eos_token_id, output_logits=True,
                return_dict_in_generate=True,
                **({} if greedy else {"temperature": sampling.temperature, "top_p": sampling.top_p, "top_k": 0}),
            )
            model = self.hf_model
            with torch.random.fork_rng(), torch.inference_mode():
                torch.manual_seed(seed)
                out = model.generate(
                    torch.tensor([p]), attention_mask=torch.ones((1, len(p)), dtype=torch.long),
                    generation_config=config,
                )
            logits = torch.stack(out.logits, dim=1).float()  # (n, steps, vocab): raw, before processors
            logp = torch.log_softmax(logits, dim=-1)
            entropy = -(logp.exp() * logp).sum(-1)  # (n, steps)
            new = out.sequences[:, len(p) :]
            gens = []
            for j in range(new.shape[0]):
                ids = new[j].tolist()
                stop = self.eos_token_id in ids
                length = ids.index(self.eos_token_id) + 1 if stop else len(ids)
                ids = ids[:length]
                lps = logp[j, torch.arange(length), torch.tensor(ids)].tolist()
                gens.append(Generation(
                    text=self.decode(ids), token_ids=ids, logprobs=lps, finish_reason="stop" if stop else "length",
                    entropy=float(entropy[j, :length].mean()), seed=seed,
                ))
            result.append(gens)
        return result
