//! The `busway` command.

fn main() {}
