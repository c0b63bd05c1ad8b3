"""Does loading a GPU engine compile nothing? Builds the stories260K engine for this GPU, then in a
fresh process loads it and generates, and compares the engine's Triton cache before and after.

    PYTHONPATH=src python3 scripts/check_triton_cache.py /tmp/stories_gpu
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from kiln import Builder, BuildConfig
from kiln.convert import AutoModelForCausalLM
from kiln.runtime.llm import DEFAULT_MODEL_DIR


def cache_files(engine_dir: Path) -> set[str]:
    return {str(p.relative_to(engine_dir)) for p in (engine_dir / "triton_cache").rglob("*") if p.is_file()}


def main() -> None:
    engine_dir = Path(sys.argv[1])
    source = AutoModelForCausalLM.from_hugging_face(DEFAULT_MODEL_DIR)
    Builder().build(source, BuildConfig(max_batch_size=8, max_input_len=256, max_seq_len=512,
                                        max_num_tokens=512)).save(engine_dir, progress=False)
    before = cache_files(engine_dir)
    run = ("from kiln import LLM, SamplingParams\n"
           f"llm = LLM({str(engine_dir)!r}, progress=False)\n"
           "print(llm.generate(['Once upon a time', 'The dog'], SamplingParams(max_tokens=40, temperature=0),"
           " use_tqdm=False)[0].outputs[0].text)\n"
           "llm.shutdown()\n")
    subprocess.run([sys.executable, "-c", run], check=True)
    after = cache_files(engine_dir)
    print(f"triton_cache files: {len(before)} after build, {len(after)} after a load and generate "
          f"in a new process; new: {sorted(after - before)[:5]}")


if __name__ == "__main__":
    main()
