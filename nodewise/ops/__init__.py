"""What the CLI, benchmarks and tests share about running nodewise on a machine: what runs now and
stopping it (``status``), the local promotion pipeline's services (``services``), and a state
folder's processes and what they listen on (``processes``)."""
