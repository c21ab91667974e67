//! A response body fed by a channel: each message is sent to the client as
//! soon as it is produced (a chunk of chunked transfer encoding), which is
//! what streamed command output needs. A bounded channel gives
//! back-pressure: a slow client slows the producer, nothing piles up.

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Frame};
use tokio::sync::mpsc;

/// The body type every route answers with.
pub type ResponseBody = UnsyncBoxBody<Bytes, Infallible>;

/// A whole body at once.
pub fn full(bytes: impl Into<Bytes>) -> ResponseBody {
    Full::new(bytes.into()).boxed_unsync()
}

/// A body that ends when the sender is dropped.
pub struct ChannelBody {
    rx: mpsc::Receiver<Bytes>,
}

impl ChannelBody {
    /// A body and the sender that feeds it, holding up to `depth` chunks.
    pub fn channel(depth: usize) -> (mpsc::Sender<Bytes>, ResponseBody) {
        let (tx, rx) = mpsc::channel(depth);
        (tx, Self::from_receiver(rx))
    }

    /// A body fed by an existing channel.
    pub fn from_receiver(rx: mpsc::Receiver<Bytes>) -> ResponseBody {
        ChannelBody { rx }.boxed_unsync()
    }
}

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.rx.poll_recv(cx).map(|chunk| chunk.map(|b| Ok(Frame::data(b))))
    }
}
