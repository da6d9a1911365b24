//! In-pod capture: the agent enters each enrolled pod's network namespace,
//! opens its listeners there and hands them to the kernel programs.
pub mod discover;
pub mod enrol;
pub mod local_delivery;
pub mod netns;
pub mod pods;
pub mod sockets;
