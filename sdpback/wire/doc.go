// Package wire is the Sockets Direct Protocol (SDP) wire codec: the Base
// Sockets Direct Header (BSDH), every message identifier (MID) with its
// extended header, the Hello and HelloAck carried in IB CM private data, the
// compact Hello (our own format for RDMA_PS_TCP), and the service-ID
// helpers. It owns byte layouts and per-message validation, nothing else:
// no state, no I/O, no imports outside the standard library.
//
// Section numbers (§) refer to the team reference ref/sdp-protocol.md; the
// human-readable summary is docs/sdp-wire.md.
//
// # Design
//
// Stream messages (one per IB SEND) decode into a Message value: BSDH fields,
// the MID's extended-header fields, and a Payload that aliases the received
// buffer — no allocation. Message.Append encodes a whole message;
// Message.PutHeader encodes only the headers, for SENDs that gather the
// payload from other memory. BSDH is a gVisor-style byte-slice view for
// reading or stamping header fields in place. Decode and the encoders share
// one rule set (Message.check), so any accepted message re-encodes to the
// same bytes. Hello and HelloAck are separate types with their own
// Decode/Append, because they live in CM private data, never in a SEND.
//
// All multi-byte fields are big-endian.
//
// # BSDH (§1), 16 bytes, at offset 0 of every message
//
//	off size field     meaning
//	 0   1   mid       message identifier
//	 1   1   flags     0x01 OOB_PRES, 0x02 OOB_PEND, 0x04 REQ_PIPE; bits 3-7 reserved
//	 2   2   bufs      receives the sender has posted (credit advertisement)
//	 4   4   len       whole message length, BSDH and extended header included
//	 8   4   mseq      this message's sequence number (Hello/HelloAck: 0)
//	12   4   mseq_ack  mseq of the last message received (Hello/HelloAck: 0)
//
// # Extended headers (§2.1, §2.2), at offset 16
//
//	MID   name             ext  fields (offset from 16)              payload
//	0x02  DisConn           -                                        no
//	0x03  AbortConn         -                                        no
//	0x04  SendSM            -                                        no
//	0x05  RdmaWrCompl       4   0 u32 bytes written                  no
//	0x06  RdmaRdCompl       4   0 u32 bytes read (never inline ones) no
//	0x07  ModeChange        4   0 u8 mode (0x00 0x10 0x20 0x80 0x90 0xA0), 1-3 reserved  no
//	0x08  SrcAvailCancel    -                                        no
//	0x09  SinkAvailCancel   -                                        no
//	0x0A  SinkCancelAck     -                                        no
//	0x0B  ChRcvBuf          4   0 u32 requested size, BSDH excluded (§10.1)  no
//	0x0C  ChRcvBufAck       4   0 u32 new size, BSDH excluded (§10.1)  no
//	0x0D  SuspComm          8   0 u64 new service ID                 no
//	0x0E  SuspCommAck       -                                        no
//	0xFD  SinkAvail        20   0 u32 len, 4 u32 rkey, 8 u64 vaddr, 16 u32 non_disc  optional
//	0xFE  SrcAvail         16   0 u32 len (inline bytes included, §10.7), 4 u32 rkey, 8 u64 vaddr  optional inline
//	0xFF  Data              -                                        optional (none: credit update)
//
// # Hello (§2.3): CM REQ private data, 92 bytes
//
//	off size field        value / rule
//	 0  16   BSDH         mid 0x00, flags 0, bufs, len 92, mseq 0, mseq_ack 0
//	16   1   MajV:MinV    0x22; major must be 2
//	17   1   IPV          high nibble 4 (0x40) or 6 (0x60); low nibble ignored
//	18   1   reserved
//	19   1   MaxAdverts   > 0
//	20   4   DesRemRcvSz  advisory
//	24   4   LocalRcvSz   BSDH included; >= MinRcvSize
//	28   2   SrcPort
//	30   2   reserved
//	32  16   SrcIP        IPv4 in bytes 44-47
//	48  16   DstIP        IPv4 in bytes 60-63
//	64  28   reserved
//
// # HelloAck (§2.4): CM REP private data, 196 bytes
//
//	off size field        value / rule
//	 0  16   BSDH         mid 0x01, flags 0, bufs, len 196, mseq 0, mseq_ack 0
//	16   1   MajV:MinV    0x22; major must be 2
//	17   2   reserved     (gen2: ipv_cap, left 0)
//	19   1   MaxAdverts   > 0
//	20   4   ActRcvSz     BSDH included; >= MinRcvSize
//	24 172   reserved
//
// # Compact Hello (our format), 32 bytes
//
// With RDMA_PS_TCP the RDMA CM puts its own 36-byte header (version, IP
// version, source port, source and destination address) in front of the REQ
// private data, leaving 56 bytes (ARCHITECTURE §5, ref §10.2). The compact
// Hello is the full Hello cut after byte 31, with two reserved bytes used to
// identify it; the addresses come from the CM header:
//
//	off size field        value / rule
//	 0  16   BSDH         mid 0x00, flags 0, bufs, len 32, mseq 0, mseq_ack 0
//	16   1   MajV:MinV    0x22; major must be 2
//	17   1   IPV          exactly 0x40 or 0x60, and equal to the CM addresses' family
//	18   1   form         CompactForm (1); other values: ErrVersion
//	19   1   MaxAdverts   > 0
//	20   4   DesRemRcvSz
//	24   4   LocalRcvSz   BSDH included; >= MinRcvSize
//	28   2   SrcPort      the SDP-level source port (the CM's port may differ)
//	30   2   magic        0x76 0x53 ("vS")
//	32  24   not ours     the CM pads to 56 bytes; ignored
//
// A full Hello cannot pass as compact (len 92, bytes 18 and 30-31 zero), nor
// a compact one as full (len 32). A receiver that does not know a future form
// number rejects it rather than misreading it.
//
// # Service IDs and Hello form per provider (§3.1, §10.2, ARCHITECTURE §5)
//
//	verbs/soft                    SDPServiceID(port) = 0x10000|port       full Hello at REQ offset 0
//	verbs/ibv, active, native IB  SDPServiceID(port) (AF_IB, offset 0)    full Hello
//	verbs/ibv, listening          TCPServiceID(port) = 0x01060000|port    compact Hello after the 36-byte CM header
//
// A mainline kernel lets no user-space listener bind an SDP service ID, so
// legacy SDP clients cannot reach a verbs/ibv listener: a kernel limit.
// PortSpace.HelloForm maps a port space to its form. The HelloAck is always
// full: REP private data has no CM header.
//
// # Validation
//
// Stream messages (Decode; the encoders apply the same rules): at least 16
// bytes; a defined MID other than Hello/HelloAck; BSDH len equal to the bytes
// received (gen1 rule, §1); room for the extended header; payload only on
// Data/SrcAvail/SinkAvail; reserved flag bits 3-7 clear; OOB_PRES only with
// at least one payload byte (it marks the last one, §6.1); SrcAvail len
// greater than its inline bytes (it counts them, §10.7) and vaddr+len not
// wrapping; SinkAvail len > 0 and not wrapping; ModeChange one of the six
// values with reserved bits/bytes clear; ChRcvBuf/ChRcvBufAck size > 0.
// Sequence numbers, credits and mode/state legality are the engine's job.
// On encode, fields the MID does not use must be zero.
//
// Hello/HelloAck: exact private-data size (the compact form: at least 32),
// the fixed BSDH values, major version 2, MaxAdverts > 0, IPV 4 or 6, the
// advertised receive size at least MinRcvSize. Reserved bytes in the full
// forms are ignored on receipt (other stacks and CM layers write the private
// data; we never interpret them) and zero when sent. The flags and the MCH
// reserved bits are rejected instead: an unknown flag could change the
// meaning of the stream.
//
// # Threat model
//
// Every byte handed to Decode, DecodeHello, DecodeHelloAck and
// DecodeCompactHello comes from an untrusted remote peer. The decoders never
// panic, never allocate (beyond errors), never read past the slice, and
// report each broken rule as an *Error wrapping one sentinel (ErrTruncated,
// ErrLength, ErrMID, ErrField, ErrVersion) and naming the field. Fault
// scope is the caller's: a bad stream message resets that connection; a
// bad Hello rejects that CM REQ (CM REJ); a bad HelloAck fails that connect.
// The BSDH view does no bounds checks beyond Go's own: use it on buffers
// of at least BSDHSize bytes (every buffer Decode accepted is).
//
// # Concurrency
//
// The package is stateless: functions and methods may be called from any
// number of goroutines. A Message's Payload aliases the decoded buffer,
// so the buffer must not be reused while the Message is in use. No locks.
package wire
