"""GPT-S configuration for Hugging Face transformers (loaded with ``trust_remote_code=True``).

Shipped inside folders written by ``gpts-edge export --format hf``. It imports nothing from
gpts_edge so the folder works on a machine that only has transformers and torch.
"""

from transformers import PretrainedConfig


class GPTSConfig(PretrainedConfig):
    model_type = "gpts"
    keys_to_ignore_at_inference = ["past_key_values", "cache"]

    def __init__(
        self,
        vocab_size: int = 4096,
        hidden_size: int = 128,
        num_hidden_layers: int = 5,
        num_attention_heads: int = 4,
        num_key_value_heads: int = 2,
        head_dim: int = 32,
        intermediate_size: int = 341,
        max_position_embeddings: int = 384,
        rope_theta: float = 2500.0,
        rms_norm_eps: float = 1e-6,
        exclusive_attention: bool = True,
        attention_bias: bool = False,
        mlp_bias: bool = False,
        hidden_act: str = "silu",
        use_cache: bool = True,
        bos_token_id: int = 0,
        eos_token_id: int = 0,
        pad_token_id: int = 0,
        tie_word_embeddings: bool = True,
        **kwargs,
    ) -> None:
        # The modelling file implements exactly one variant; refuse others instead of
        # silently computing something else.
        if num_attention_heads % num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({num_key_value_heads})"
            )
        if attention_bias or mlp_bias or hidden_act != "silu" or not tie_word_embeddings:
            raise ValueError(
                "GPT-S supports only attention_bias=false, mlp_bias=false, hidden_act='silu' and "
                "tie_word_embeddings=true"
            )
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.head_dim = head_dim
        self.intermediate_size = intermediate_size
        self.max_position_embeddings = max_position_embeddings
        self.rope_theta = rope_theta
        self.rms_norm_eps = rms_norm_eps
        self.exclusive_attention = exclusive_attention
        self.attention_bias = attention_bias
        self.mlp_bias = mlp_bias
        self.hidden_act = hidden_act
        self.use_cache = use_cache
        super().__init__(
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )
