//! The conformance cases (`conformance_cases/cases.rs`) on the `local` transport.

#[path = "conformance_cases/cases.rs"]
mod cases;

const TRANSPORT: dataviz_mercure::Transport = dataviz_mercure::Transport::Local;
