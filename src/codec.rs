//! Typed payloads: JSON and MessagePack codecs, named by the `content_type` header, and the
//! [`BusExt`] helpers implemented for every [`Bus`].

use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::bus::Bus;
use crate::delivery::Delivery;
use crate::error::{Error, ErrorKind, Result};
use crate::message::Message;
use crate::topic::Topic;

/// A payload encoding, carried in the `content_type` header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Codec {
    /// `application/json` (serde_json).
    Json,
    /// `application/msgpack` (rmp-serde, struct fields by name).
    MsgPack,
}

impl Codec {
    /// The content type this codec writes.
    pub fn content_type(self) -> &'static str {
        match self {
            Codec::Json => "application/json",
            Codec::MsgPack => "application/msgpack",
        }
    }

    /// The codec named by a content type, if any.
    pub fn from_content_type(content_type: &str) -> Option<Codec> {
        match content_type {
            "application/json" => Some(Codec::Json),
            "application/msgpack" | "application/x-msgpack" => Some(Codec::MsgPack),
            _ => None,
        }
    }

    /// Encodes a value.
    ///
    /// # Errors
    /// [`ErrorKind::Encode`] when serde fails.
    pub fn encode<T: Serialize + ?Sized>(self, value: &T) -> Result<Bytes> {
        let out = match self {
            Codec::Json => serde_json::to_vec(value).map_err(|e| enc_err(self, e))?,
            Codec::MsgPack => rmp_serde::to_vec_named(value).map_err(|e| enc_err(self, e))?,
        };
        Ok(Bytes::from(out))
    }

    /// Decodes a value.
    ///
    /// # Errors
    /// [`ErrorKind::Decode`] naming the codec and serde's reason.
    pub fn decode<T: DeserializeOwned>(self, bytes: &[u8]) -> Result<T> {
        match self {
            Codec::Json => serde_json::from_slice(bytes).map_err(|e| dec_err(self, e)),
            Codec::MsgPack => rmp_serde::from_slice(bytes).map_err(|e| dec_err(self, e)),
        }
    }
}

fn enc_err(codec: Codec, e: impl std::error::Error + Send + Sync + 'static) -> Error {
    Error::new(
        ErrorKind::Encode,
        format!("cannot encode as {}", codec.content_type()),
    )
    .with_source(e)
}

fn dec_err(codec: Codec, e: impl std::error::Error + Send + Sync + 'static) -> Error {
    Error::new(
        ErrorKind::Decode,
        format!("cannot decode {} payload", codec.content_type()),
    )
    .with_source(e)
}

impl Message {
    /// Encodes `value` with `codec` into a message on `topic`, content type set.
    ///
    /// # Errors
    /// [`ErrorKind::Encode`] when serde fails.
    pub fn encode<T: Serialize + ?Sized>(topic: Topic, value: &T, codec: Codec) -> Result<Message> {
        Ok(Message::new(topic, codec.encode(value)?).with_content_type(codec.content_type()))
    }

    /// Decodes the payload with the codec its `content_type` names (JSON when unset).
    ///
    /// # Errors
    /// [`ErrorKind::Decode`] when the bytes do not decode, or the content type names no
    /// known codec.
    pub fn decode<T: DeserializeOwned>(&self) -> Result<T> {
        let codec = match self.headers.content_type.as_deref() {
            None => Codec::Json,
            Some(ct) => Codec::from_content_type(ct).ok_or_else(|| {
                Error::new(
                    ErrorKind::Decode,
                    format!(
                        "message on {:?} has content type {ct:?}, which no codec reads",
                        self.topic.as_str()
                    ),
                )
            })?,
        };
        codec
            .decode(&self.payload)
            .map_err(|e| e.context(format!("topic {:?}", self.topic.as_str())))
    }
}

impl Delivery {
    /// Decodes the payload (see [`Message::decode`]).
    ///
    /// # Errors
    /// [`ErrorKind::Decode`] when the payload does not decode.
    pub fn decode<T: DeserializeOwned>(&self) -> Result<T> {
        self.message().decode()
    }
}

/// Typed helpers for every [`Bus`]: encode with a codec, publish, request.
#[async_trait]
pub trait BusExt: Bus {
    /// Publishes `value` encoded with `codec` on `topic`.
    async fn publish_as<T: Serialize + Sync + ?Sized>(
        &self,
        topic: &Topic,
        value: &T,
        codec: Codec,
    ) -> Result<()> {
        self.publish(Message::encode(topic.clone(), value, codec)?)
            .await
    }

    /// Publishes `value` as JSON on `topic`.
    async fn publish_json<T: Serialize + Sync + ?Sized>(
        &self,
        topic: &Topic,
        value: &T,
    ) -> Result<()> {
        self.publish_as(topic, value, Codec::Json).await
    }

    /// Publishes `value` as MessagePack on `topic`.
    async fn publish_msgpack<T: Serialize + Sync + ?Sized>(
        &self,
        topic: &Topic,
        value: &T,
    ) -> Result<()> {
        self.publish_as(topic, value, Codec::MsgPack).await
    }

    /// Sends `value` as JSON and decodes the reply.
    async fn request_json<Q: Serialize + Sync + ?Sized, R: DeserializeOwned>(
        &self,
        topic: &Topic,
        value: &Q,
        timeout: Duration,
    ) -> Result<R> {
        let reply = self
            .request(Message::encode(topic.clone(), value, Codec::Json)?, timeout)
            .await?;
        reply.decode()
    }
}

impl<B: Bus + ?Sized> BusExt for B {}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
    struct Quote {
        symbol: String,
        bid: f64,
    }

    #[test]
    fn round_trips_by_content_type() {
        let q = Quote {
            symbol: "AAPL".into(),
            bid: 1.5,
        };
        for codec in [Codec::Json, Codec::MsgPack] {
            let m = Message::encode(Topic::new("q.AAPL").unwrap(), &q, codec).unwrap();
            assert_eq!(
                m.headers.content_type.as_deref(),
                Some(codec.content_type())
            );
            assert_eq!(m.decode::<Quote>().unwrap(), q);
        }
    }

    #[test]
    fn bad_bytes_are_a_decode_error_naming_the_topic() {
        let m = Message::try_new("q.AAPL", &b"\xff\x00"[..]).unwrap();
        let err = m.decode::<Quote>().unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Decode);
        assert!(err.to_string().contains("q.AAPL"), "{err}");
        let m = m.with_content_type("text/csv");
        assert!(m
            .decode::<Quote>()
            .unwrap_err()
            .to_string()
            .contains("text/csv"));
    }
}
