import logging

# peft imports bitsandbytes when it is installed (the nf4 extra, CI), and bitsandbytes then warns on every CPU with
# avx512_bf16 that an optional kernel package ("kernels") is missing; NF4 runs without it (tests/test_llm_loading.py)
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
