//! The conformance cases (`conformance_cases/cases.rs`) on the `jetstream` transport: each
//! case's hub on a stream of a nats-server of its own.

#[path = "conformance_cases/cases.rs"]
mod cases;

const TRANSPORT: dataviz_mercure::Transport = dataviz_mercure::Transport::Jetstream;
