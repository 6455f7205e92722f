"""What the CLI, benchmarks and tests share about running nodewise on a machine: what runs now and
stopping it (``status``), and the local promotion pipeline's services (``services``)."""
