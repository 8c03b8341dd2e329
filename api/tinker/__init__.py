"""The Tinker-compatible training API (issue 16): what Thinking Machines' official `tinker` SDK calls, under
`/tinker/api/v1/`, answered from PostgreSQL futures and a Valkey queue per base model; a model server
(`python -m gpu_runtime.model_server serve`) executes the operations and writes results back through
`/tinker/ingest/...`. Wire format: ../shared/design/TINKER_PROTOCOL.md."""
