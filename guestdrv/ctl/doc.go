// Package ctl is vsdp's guest control protocol: the messages a guest
// process exchanges with vsdpd over one AF_VSOCK connection to the host's
// control port (DefaultPort), beside the vsock streams that carry data.
// libvsdp.so (C) and vsdpnet (Go) speak it in the guest; sdpback serves it
// on the host. docs/control-protocol.md describes the exchanges.
//
// # Framing
//
// Every frame is an 8-byte header {u8 version (1), u8 type, le16 body
// length, le32 id} and a body whose size is fixed per type (BodySize). All
// integers are little-endian. An address is 20 bytes: {u8 family (0 none,
// 2 AF_INET, 10 AF_INET6), u8 zero, le16 port, 16 bytes of address in
// network order, IPv4 in the first four and the rest zero}.
//
// # Threat model
//
// The guest is untrusted. Decode checks the version, the type, the exact
// body size and every address byte, and never reads beyond its input; a
// malformed frame (ErrFrame) ends that control connection only. The Reader
// buffers at most one frame. The package is pure and has no state.
package ctl
