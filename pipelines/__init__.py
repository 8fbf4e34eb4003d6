"""What Prefect executes for dhub.

    flow.py                the generic flow `run-pipeline(batch_id, pipeline_id, pipeline_version)`
    state_hooks.py         its Prefect state hooks: the run's end as `batch.state stop` with an
                           outcome
    sdk.py                 the step SDK: `StepContext.report()`, coalesced `step.offsets`, step
                           states
    publisher.py           a batch's events to Kafka, each awaited until acknowledged
    steps.py               imports the code a `dhub.steps` plugin declares for a `uses`
                           (declarations and config models: `core.step_catalogue`)
    prefect_deployment.py  `ensure_deployment()`: the Prefect deployment `run-pipeline/<name>`
    sales/                 the demo `sales-pipeline` (extract, transform, load on generated
                           records)
    sales/plugin.py        the sales steps' declarations (config model, code paths, clean-up)
"""
