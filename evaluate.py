"""Evaluate models: lm-eval-compatible zero-shot accuracy, perplexity, KV cache, throughput.

    python evaluate.py --model smollm2-135m-instruct --tasks piqa,arc_easy --limit 100 --data-dir DIR

See zebra/eval/main.py for every option.
"""

from zebra.eval.main import main

if __name__ == "__main__":
    main()
