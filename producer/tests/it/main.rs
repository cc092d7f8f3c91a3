//! Integration tests of `gantry-producer` against the real RabbitMQ and Postgres: each test
//! gets a unique queue prefix and a fresh database, both removed at its end.
//!
//! RabbitMQ: `GANTRY_AMQP_URL` (default `amqp://guest:guest@127.0.0.1:5672/%2f`).
//! Postgres: `GANTRY_DATABASE_URL` (default `postgres://gantry:gantry@127.0.0.1:5432/gantry`);
//! its role must be allowed to create databases.

// A test that cannot go on should stop there, loudly.
#![allow(clippy::unwrap_used)]

mod helpers;
mod submit;
mod wait;
