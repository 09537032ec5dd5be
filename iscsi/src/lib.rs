//! nvtarget-iscsi: the target side of iSCSI (RFC 7143), sans-IO.
//!
//! Bytes and `now: Instant` go in, bytes ([`Transmit`]) and [`Event`]s come
//! out; there are no sockets, no tasks and no SCSI semantics here (a CDB is
//! opaque bytes). A driver (the binary's `portal.rs`) moves bytes between a
//! TCP socket and a [`Connection`], runs [`Event::Command`]s against the SCSI
//! layer and hands the results back with [`Connection::complete`].
//!
//! The driver's loop, in this order:
//!
//! 1. drain [`Connection::poll_event`]: run each [`Event::Command`] and call
//!    [`Connection::complete`]; answer [`Event::TaskMgmt`] with
//!    [`Connection::complete_tmf`]; on [`Event::Close`] close the socket;
//! 2. write everything [`Connection::poll_transmit`] returns (header, data and
//!    tail of each [`Transmit`] as one vectored write);
//! 3. wait for socket input ([`Connection::handle_input`]) or the instant of
//!    [`Connection::poll_timeout`] ([`Connection::handle_timeout`]).
//!
//! A close is reported only once every transmit queued before it was taken,
//! so a Logout or Login-failure response always goes out first. Reading no
//! more input until the transmits are written is what bounds memory.
//!
//! Modules: [`pdu`] frames PDUs, [`msg`] gives typed views of each PDU,
//! [`text`] parses `key=value` data, [`params`] negotiates, [`chap`]
//! authenticates, `login` runs the login phase and [`conn`] the full-feature
//! phase.
#![forbid(unsafe_code)]

pub mod chap;
pub mod conn;
mod login;
pub mod msg;
pub mod params;
pub mod pdu;
pub mod text;

pub use chap::{ChapAlgorithm, ChapSecrets};
pub use conn::{
    lun_field, lun_id, sn_lt, transport_sense, CloseReason, Command, CompleteError, Completion,
    Connection, ConnectionConfig, Event, ReferencedTask, TaskMgmt,
};
pub use login::{LoginInfo, LoginStatus, Lookup, SessionIds, SessionType, TargetDirectory};
pub use msg::{LogoutReason, RejectReason, TaskAttr, TmfFunction, TmfResponse};
pub use params::{SessionParams, TargetParams};
pub use pdu::{Bhs, DecodeError, Digests, Opcode, Pdu, Transmit};

/// Every error this crate's public operations return.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Decode(#[from] pdu::DecodeError),
    #[error(transparent)]
    Text(#[from] text::TextError),
    #[error(transparent)]
    Complete(#[from] conn::CompleteError),
}
