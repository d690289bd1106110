//! The redis transport for busway.
