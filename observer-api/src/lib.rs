//! The flow observer's gRPC API (`clustermesh.observer.v1`): what each agent serves on its
//! observer address and what `clustermesh observe` reads, modelled on Hubble's
//! `observer.proto` (GetFlows with filters and follow mode, ServerStatus) but smaller.
//!
//! Generated code only; it must not contain logic (the agent's `observer` module serves
//! it, the CLI's `observe` consumes it).
#![allow(missing_docs, clippy::all)]

tonic::include_proto!("clustermesh.observer.v1");
