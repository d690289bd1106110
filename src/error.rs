//! The one error type of busway.

use std::fmt;

/// A `Result` whose error is busway's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What kind of failure an [`Error`] is. Match on this, never on the message text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// A topic string broke the topic rules.
    InvalidTopic,
    /// A pattern string broke the pattern rules.
    InvalidPattern,
    /// A config file or value is wrong (the message names the file, key and reason).
    InvalidConfig,
    /// A config named a transport kind that no factory is registered for.
    UnknownTransport,
    /// No route and no default bus carries the topic.
    NoRoute,
    /// The bus cannot do what was asked (see its [`Capabilities`](crate::Capabilities)).
    Unsupported,
    /// The bus (or the subscription) was closed.
    Closed,
    /// An operation did not finish within its deadline.
    Timeout,
    /// A request found nobody subscribed to answer it.
    NoResponders,
    /// The broker could not be reached, or the connection broke.
    Connection,
    /// The broker refused the credentials.
    Auth,
    /// The payload is larger than the bus accepts.
    PayloadTooLarge,
    /// Bytes could not be decoded (a frame, or a typed payload).
    Decode,
    /// Encoding a typed value failed.
    Encode,
    /// The broker answered with an error.
    Broker,
    /// A publish found the outage buffer full.
    BufferFull,
    /// Anything else.
    Other,
}

impl ErrorKind {
    /// A short, stable name for the kind (`"no_route"`, `"timeout"`...).
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::InvalidTopic => "invalid_topic",
            ErrorKind::InvalidPattern => "invalid_pattern",
            ErrorKind::InvalidConfig => "invalid_config",
            ErrorKind::UnknownTransport => "unknown_transport",
            ErrorKind::NoRoute => "no_route",
            ErrorKind::Unsupported => "unsupported",
            ErrorKind::Closed => "closed",
            ErrorKind::Timeout => "timeout",
            ErrorKind::NoResponders => "no_responders",
            ErrorKind::Connection => "connection",
            ErrorKind::Auth => "auth",
            ErrorKind::PayloadTooLarge => "payload_too_large",
            ErrorKind::Decode => "decode",
            ErrorKind::Encode => "encode",
            ErrorKind::Broker => "broker",
            ErrorKind::BufferFull => "buffer_full",
            ErrorKind::Other => "other",
        }
    }

    /// Whether trying the same operation again later can succeed.
    pub fn is_temporary(self) -> bool {
        matches!(
            self,
            ErrorKind::Timeout | ErrorKind::Connection | ErrorKind::BufferFull
        )
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// busway's error: a kind, a message naming what was involved (bus, topic, config key), and
/// the underlying error when there is one.
///
/// Messages never contain passwords or tokens: transports redact URLs before they put them
/// in an error.
pub struct Error {
    kind: ErrorKind,
    message: String,
    source: Option<Box<dyn std::error::Error + Send + Sync + 'static>>,
}

impl Error {
    /// A new error of `kind` with a message.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Error {
            kind,
            message: message.into(),
            source: None,
        }
    }

    /// Attaches the error that caused this one.
    pub fn with_source(mut self, source: impl std::error::Error + Send + Sync + 'static) -> Self {
        self.source = Some(Box::new(source));
        self
    }

    /// Prefixes the message with context, e.g. the bus name: `bus "engine": ...`. A message
    /// that already starts with that context keeps one copy of it.
    pub fn context(mut self, context: impl fmt::Display) -> Self {
        let context = context.to_string();
        let already = self
            .message
            .strip_prefix(context.as_str())
            .is_some_and(|rest| rest.starts_with(':') || rest.starts_with(' '));
        if !already {
            self.message = format!("{context}: {}", self.message);
        }
        self
    }

    /// The kind of failure.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The message, without the source chain.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// Whether retrying the operation later can succeed.
    pub fn is_temporary(&self) -> bool {
        self.kind.is_temporary()
    }

    /// Shorthand for an [`ErrorKind::Closed`] error.
    pub fn closed(what: impl fmt::Display) -> Self {
        Error::new(ErrorKind::Closed, format!("{what} is closed"))
    }

    /// Shorthand for an [`ErrorKind::Unsupported`] error.
    pub fn unsupported(message: impl Into<String>) -> Self {
        Error::new(ErrorKind::Unsupported, message)
    }

    /// Shorthand for an [`ErrorKind::InvalidConfig`] error.
    pub fn config(message: impl Into<String>) -> Self {
        Error::new(ErrorKind::InvalidConfig, message)
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("Error");
        d.field("kind", &self.kind).field("message", &self.message);
        if let Some(source) = &self.source {
            d.field("source", &source.to_string());
        }
        d.finish()
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)?;
        if let Some(source) = &self.source {
            write!(f, ": {source}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_deref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}
