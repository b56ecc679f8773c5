//! Distributed locks on Redis (see the crate README section in the workspace README).
