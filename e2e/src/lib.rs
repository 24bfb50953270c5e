//! End-to-end tests of the whole pipeline over a real nats-server live in `tests/`.
