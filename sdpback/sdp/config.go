package sdp

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"syscall"
	"time"

	"github.com/vsdp/vsdp/sdpback/wire"
	"github.com/vsdp/vsdp/verbs"
)

// Defaults for Config's zero values.
const (
	DefaultRecvBufs     = 16
	DefaultRecvBufSize  = 32<<10 + wire.BSDHSize // gen2's 8 pages plus the BSDH (ref §4.3)
	DefaultSendBufs     = 16
	DefaultCloseTimeout = 60 * time.Second // gen2's DisConn wait (ref §3.4)
	DefaultDialTimeout  = 10 * time.Second
	DefaultNagleDelay   = 100 * time.Millisecond // gen2's back-stop timer (ref §4.2)
	DefaultBacklog      = 128
	DefaultBufferSets   = 4 // idle registered buffer sets a stack keeps (1 MiB each with the defaults)
	minRecvBufs         = 4
	maxBufs             = 1024
	ctlSlotSize         = 64 // a BSDH plus the largest extended header (36 bytes)
	ctlSlots            = 8  // control messages in flight beside data
)

// Credit reserve (ref §4.1, CA4-82): a message carrying payload needs more
// than two credits, a payload-free control message two, a pure credit
// update one, so the last credit always remains for telling the peer about
// reposted buffers and neither side can starve the other.
const (
	creditsForData    = 3
	creditsForControl = 2
	creditsForUpdate  = 1
)

// PortSpace selects how the stack names services and carries the Hello.
type PortSpace uint8

const (
	// PortSpaceAuto uses the SDP service IDs (0x10000|port, full Hello) when
	// the device can listen on them, else RDMA_PS_TCP with the compact
	// Hello (verbs/ibv on a mainline kernel; ARCHITECTURE.md §5).
	PortSpaceAuto PortSpace = iota
	PortSpaceSDP
	PortSpaceTCP
)

// Clock is the engine's source of time, injected so tests are
// deterministic.
type Clock interface {
	Now() time.Time
	AfterFunc(d time.Duration, f func()) Timer
}

// Timer is a stoppable timer from a Clock.
type Timer interface{ Stop() bool }

type realClock struct{}

func (realClock) Now() time.Time                            { return time.Now() }
func (realClock) AfterFunc(d time.Duration, f func()) Timer { return time.AfterFunc(d, f) }

// Config configures a Stack. The zero value of every field but Device means
// its default.
type Config struct {
	Device verbs.Device
	// Addr is this stack's fabric address: the source of its Hellos and
	// the address its listeners report.
	Addr netip.Addr
	// PortSpace chooses SDP or RDMA_PS_TCP service IDs.
	PortSpace PortSpace
	// RecvBufs and RecvBufSize size each connection's posted receives (the
	// peer's credits); RecvBufSize includes the 16-byte BSDH.
	RecvBufs    int
	RecvBufSize int
	// SendBufs bounds data messages in flight per connection.
	SendBufs int
	// BufferSets bounds the registered buffer sets (a connection's receive,
	// send and control buffers) that the stack keeps from released
	// connections for new ones, so set-up skips allocating and registering
	// them; idle memory is at most BufferSets × (RecvBufs + SendBufs) ×
	// RecvBufSize. Connections beyond the pool allocate their own. Zero
	// means DefaultBufferSets; a negative value keeps none.
	BufferSets int
	// RNRRetry is the queue pairs' RNR retry count: 0 (the default, what
	// the last shipped SDP used) turns any credit accounting error into a
	// reset instead of a stall.
	RNRRetry uint8
	// DialTimeout bounds address resolution and the CM handshake when the
	// caller's context has no deadline.
	DialTimeout time.Duration
	// CloseTimeout bounds the wait for the peer's DisConn after ours.
	CloseTimeout time.Duration
	// NagleDelay is the back-stop for holding a partial message.
	NagleDelay time.Duration
	// Keepalive, when non-zero, sends a zero-length RDMA WRITE on a
	// connection idle that long: a dead peer then surfaces as a reset.
	Keepalive time.Duration
	Clock     Clock
}

func (c *Config) defaults() error {
	if c.Device == nil {
		return errors.New("sdp: Config.Device is required")
	}
	if c.RecvBufs == 0 {
		c.RecvBufs = DefaultRecvBufs
	}
	if c.RecvBufSize == 0 {
		c.RecvBufSize = DefaultRecvBufSize
	}
	if c.SendBufs == 0 {
		c.SendBufs = DefaultSendBufs
	}
	if c.DialTimeout == 0 {
		c.DialTimeout = DefaultDialTimeout
	}
	if c.CloseTimeout == 0 {
		c.CloseTimeout = DefaultCloseTimeout
	}
	if c.NagleDelay == 0 {
		c.NagleDelay = DefaultNagleDelay
	}
	if c.Clock == nil {
		c.Clock = realClock{}
	}
	switch {
	case c.BufferSets == 0:
		c.BufferSets = DefaultBufferSets
	case c.BufferSets < 0:
		c.BufferSets = 0
	}
	switch {
	case c.BufferSets > maxBufs:
		return fmt.Errorf("sdp: BufferSets %d above %d", c.BufferSets, maxBufs)
	case c.RecvBufs < minRecvBufs || c.RecvBufs > maxBufs:
		return fmt.Errorf("sdp: RecvBufs %d outside %d..%d", c.RecvBufs, minRecvBufs, maxBufs)
	case c.SendBufs < 1 || c.SendBufs > maxBufs:
		return fmt.Errorf("sdp: SendBufs %d outside 1..%d", c.SendBufs, maxBufs)
	case c.RecvBufSize < wire.BSDHSize+64 || c.RecvBufSize > 1<<20:
		return fmt.Errorf("sdp: RecvBufSize %d outside %d..%d", c.RecvBufSize, wire.BSDHSize+64, 1<<20)
	case c.RNRRetry > 7:
		return fmt.Errorf("sdp: RNRRetry %d above 7", c.RNRRetry)
	}
	return nil
}

// Errors. At the net.Conn edge the engine returns what package net does:
// *net.OpError wrapping a syscall errno (so errors.Is(err,
// syscall.ECONNREFUSED) works), net.ErrClosed, io.EOF and
// os.ErrDeadlineExceeded.
var (
	// ErrProtocol: the peer broke the SDP protocol; the connection was
	// reset. Errors carrying it also wrap syscall.ECONNRESET.
	ErrProtocol = errors.New("sdp: peer protocol violation")
	// ErrAborted: the connection was aborted (locally or by the peer).
	ErrAborted = errors.New("sdp: connection aborted")
)

// resetError is why a connection was reset: it matches ECONNRESET and the
// cause.
type resetError struct{ cause error }

func (e *resetError) Error() string { return "connection reset: " + e.cause.Error() }

func (e *resetError) Unwrap() []error { return []error{syscall.ECONNRESET, e.cause} }

// dialErrno maps a verbs connection failure to the errno a TCP caller
// expects (gen2's mapping, ref §3.3).
func dialErrno(err error) error {
	switch {
	case errors.Is(err, verbs.ErrRefused):
		return errors.Join(syscall.ECONNREFUSED, err)
	case errors.Is(err, verbs.ErrUnreachable):
		return errors.Join(syscall.ENETUNREACH, err)
	case errors.Is(err, verbs.ErrTimeout), errors.Is(err, os.ErrDeadlineExceeded):
		return errors.Join(syscall.ETIMEDOUT, err)
	}
	return err
}

// Addr is an SDP endpoint address.
type Addr struct{ netip.AddrPort }

// Network implements net.Addr.
func (Addr) Network() string { return "sdp" }

var _ net.Addr = Addr{}
