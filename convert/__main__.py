"""python -m convert HF_DIR OUT_DIR [--dtype float32|bfloat16] [--quantize int8 [--group-size G]]"""

from convert.cli import main

if __name__ == "__main__":
    main()
