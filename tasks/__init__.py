"""requant's work, one package per stage of the card. Lowest first; a package imports only those before it:

    core      errors, locks, signals
    recipes   quantization recipes, one module each
    config    params.yaml as typed settings
    data      fetch, prepare, version, validate
    models    model families, tokenization, ONNX graphs and sessions
    serve     the served model, its front and server processes, rollout and rollback rules
    track     MLflow: runs, registry, run repair (the only package that imports MLflow)
    measure   instruments: scoring, timing, memory, intervals, screens' statistics, cost, served capacity
    build     the FP32 reference, candidates built and proven, preflight checks
    evaluate  candidates scored, timed, priced and confirmed; the speed screen
    decide    selection, search, the decision's records and reports
    train     baseline training, fine-tuning, quantization-aware training

Nothing here imports Prefect: flows/ wires these functions into Prefect tasks and flows.
tests/test_architecture.py holds the order to account.
"""
