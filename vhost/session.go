package vhost

import (
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/vsdp/vsdp/vhost/guestmem"
	"github.com/vsdp/vsdp/vhost/virtq"
	"golang.org/x/sys/unix"
)

// ring is the front-end's view of one vring: what SET_VRING_* configured.
// All fields but errf and run are owned by the session's message loop.
type ring struct {
	index   int
	num     uint16 // SET_VRING_NUM; 0 until set (32768 fits: 0x8000)
	addr    VringAddr
	hasAddr bool
	base    uint16 // SET_VRING_BASE; the last avail index once stopped
	kick    *virtq.Kicker
	call    *os.File
	errf    atomic.Pointer[os.File] // read by the ring goroutine when it breaks
	enabled bool
	run     *run // written under Session.mu; the message loop reads it freely
}

// run is one started+enabled period of a ring, with its goroutine.
type run struct {
	ring *ring
	q    *virtq.Queue
	kick *virtq.Kicker
	done chan struct{} // closed when the goroutine exits
	halt atomic.Bool   // stopping or broken is set: the goroutine must look

	// Guarded by Session.mu.
	stopping bool  // the message loop is stopping the ring
	broken   error // another ring's goroutine found this queue broken

	// Written by the goroutine before done is closed, read after.
	devStopped bool
}

// Session is one front-end connection: its negotiation, memory, rings and
// device. Its message loop runs on the goroutine that called
// Server.ServeConn (or one Server.Serve started).
type Session struct {
	srv   *Server
	id    uint64
	conn  *net.UnixConn
	dev   Device
	info  Info
	mem   *guestmem.Memory
	rings []*ring
	neg   negotiation
	owned bool
	stats counters

	// mu guards ring.run and run.stopping/broken against the ring
	// goroutines. It is a leaf lock: nothing blocks or calls the device
	// while holding it (virtq.Queue's own lock may be taken under it).
	mu sync.Mutex

	buf   [HeaderSize + MaxPayload]byte
	oob   []byte
	fds   []int
	reply []byte
}

// ID returns the session's number within its server (from 1).
func (s *Session) ID() uint64 { return s.id }

// Stats returns the session's counters.
func (s *Session) Stats() Stats { return s.stats.snapshot() }

// msg is one received message. fds[i] is set to -1 once a handler takes it;
// the rest are closed after handling.
type msg struct {
	h     Header
	p     []byte
	fds   []int
	nfds  int  // fds received, including any closed for exceeding MaxFDs
	trunc bool // the kernel truncated the ancillary data
}

func (m *msg) take(i int) int {
	fd := m.fds[i]
	m.fds[i] = -1
	return fd
}

func (m *msg) closeFDs() {
	for i, fd := range m.fds {
		if fd >= 0 {
			unix.Close(fd)
			m.fds[i] = -1
		}
	}
}

func (s *Session) init(dev Device) error {
	info := dev.Info()
	if err := info.validate(); err != nil {
		return err
	}
	if info.MaxQueueSize == 0 {
		info.MaxQueueSize = virtq.MaxSize
	}
	s.dev, s.info = dev, info
	s.mem = guestmem.NewMemory(s.srv.MaxMemSlots)
	s.rings = make([]*ring, info.Queues)
	for i := range s.rings {
		s.rings[i] = &ring{index: i}
	}
	s.neg = negotiation{
		features:     FeatureVersion1 | FeatureIndirectDesc | FeatureEventIdx | FeatureProtocolFeatures | info.Features,
		protocol:     ProtocolMQ | ProtocolReplyAck | ProtocolConfigureMemSlots | ProtocolResetDevice,
		queues:       info.Queues,
		maxQueueSize: info.MaxQueueSize,
	}
	if info.Config {
		s.neg.protocol |= ProtocolConfig
	}
	s.oob = make([]byte, unix.CmsgSpace(4*MaxFDs))
	return nil
}

// serve runs the message loop until the front-end disconnects (nil), the
// stream becomes unparsable (ErrProtocol) or the connection is closed.
func (s *Session) serve() error {
	for {
		m, err := s.read()
		if err != nil {
			if errors.Is(err, io.EOF) {
				return nil
			}
			return err
		}
		if err := s.handle(m); err != nil {
			return err
		}
	}
}

// recv fills b with recvmsg calls, collecting the fds that arrive with it.
func (s *Session) recv(b []byte, m *msg) error {
	for got := 0; got < len(b); {
		n, oobn, flags, _, err := s.conn.ReadMsgUnix(b[got:], s.oob)
		if oobn > 0 {
			s.collect(s.oob[:oobn], m)
		}
		if flags&unix.MSG_CTRUNC != 0 {
			m.trunc = true
		}
		got += n
		if err != nil {
			if got == 0 && errors.Is(err, io.EOF) {
				return io.EOF
			}
			if errors.Is(err, io.EOF) {
				err = io.ErrUnexpectedEOF
			}
			return err
		}
		if n == 0 {
			if got == 0 {
				return io.EOF
			}
			return io.ErrUnexpectedEOF
		}
	}
	return nil
}

// collect takes the fds out of ancillary data; beyond MaxFDs they are
// closed at once and only counted.
func (s *Session) collect(oob []byte, m *msg) {
	cmsgs, err := unix.ParseSocketControlMessage(oob)
	if err != nil {
		m.trunc = true
		return
	}
	for i := range cmsgs {
		if cmsgs[i].Header.Level != unix.SOL_SOCKET || cmsgs[i].Header.Type != unix.SCM_RIGHTS {
			continue
		}
		fds, err := unix.ParseUnixRights(&cmsgs[i])
		if err != nil {
			m.trunc = true
			continue
		}
		for _, fd := range fds {
			m.nfds++
			if len(m.fds) < MaxFDs {
				m.fds = append(m.fds, fd)
			} else {
				unix.Close(fd)
			}
		}
	}
}

func (s *Session) read() (*msg, error) {
	m := &msg{fds: s.fds[:0]}
	hb := s.buf[:HeaderSize]
	if err := s.recv(hb, m); err != nil {
		m.closeFDs()
		if errors.Is(err, io.EOF) {
			return nil, io.EOF
		}
		if errors.Is(err, io.ErrUnexpectedEOF) {
			return nil, fmt.Errorf("%w: connection closed inside a header", ErrProtocol)
		}
		return nil, err
	}
	m.h, _ = ParseHeader(hb)
	if m.h.Size > MaxPayload {
		m.closeFDs()
		s.countMessage(m.h.Request)
		s.inc(cRejected)
		return nil, &MessageError{Request: m.h.Request, Err: fmt.Errorf("%w: payload of %d bytes exceeds %d; stream abandoned", ErrProtocol, m.h.Size, MaxPayload)}
	}
	m.p = s.buf[HeaderSize : HeaderSize+int(m.h.Size)]
	if err := s.recv(m.p, m); err != nil {
		m.closeFDs()
		if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
			return nil, fmt.Errorf("%w: connection closed inside a %s payload", ErrProtocol, m.h.Request)
		}
		return nil, err
	}
	return m, nil
}

// handle validates and dispatches one message, closes the fds it did not
// consume and sends the reply that is due. Only a failed write is fatal.
func (s *Session) handle(m *msg) error {
	s.countMessage(m.h.Request)
	if s.srv.Record != nil {
		s.srv.Record(Message{Session: s.id, Header: m.h, Payload: m.p, FDs: m.nfds})
	}
	var (
		out Payload
		err error
	)
	if m.trunc {
		err = msgErr(m.h.Request, ErrProtocol, "ancillary data truncated (more than %d fds?)", MaxFDs)
	} else {
		var pl Payload
		if pl, err = validate(m.h, m.p, m.nfds, &s.neg); err == nil {
			out, err = s.dispatch(m, pl)
		}
	}
	m.closeFDs()
	s.fds = m.fds[:0]
	if err != nil {
		s.inc(cRejected)
	}
	s.srv.trace(Event{Session: s.id, Kind: EventMessage, Header: m.h, FDs: m.nfds, Queue: -1, Err: err})

	switch {
	case m.h.Request.HasReply():
		if err != nil {
			// No error channel exists for these replies; an empty payload
			// is what the spec gives GET_CONFIG, and any front-end fails a
			// reply of the wrong size instead of waiting forever.
			return s.write(m.h.Request, nil)
		}
		return s.write(m.h.Request, out)
	case m.h.Flags&FlagNeedReply != 0 && s.neg.ackedProtocol&ProtocolReplyAck != 0:
		status := U64(0)
		if err != nil {
			status = 1
		}
		return s.write(m.h.Request, status)
	}
	return nil
}

func (s *Session) write(req Request, p Payload) error {
	b := s.reply[:0]
	b = Header{Request: req, Flags: FlagVersion | FlagReply}.Append(b)
	if p != nil {
		b = p.Append(b)
	}
	ne.PutUint32(b[8:], uint32(len(b)-HeaderSize))
	s.reply = b
	if _, err := s.conn.Write(b); err != nil {
		return fmt.Errorf("vhost: writing %s reply: %w", req, err)
	}
	return nil
}

func wrap(req Request, sentinel, err error) error {
	return &MessageError{Request: req, Err: fmt.Errorf("%w: %w", sentinel, err)}
}

// dispatch runs the handler of a validated message.
func (s *Session) dispatch(m *msg, pl Payload) (Payload, error) {
	req := m.h.Request
	switch req {
	case ReqGetFeatures:
		return U64(s.neg.features), nil
	case ReqSetFeatures:
		return nil, s.setFeatures(uint64(pl.(U64)))
	case ReqGetProtocolFeatures:
		return U64(s.neg.protocol), nil
	case ReqSetProtocolFeatures:
		s.neg.ackedProtocol = uint64(pl.(U64))
		return nil, nil
	case ReqSetOwner:
		if s.owned {
			return nil, msgErr(req, ErrState, "already owned")
		}
		s.owned = true
		return nil, nil
	case ReqResetOwner:
		s.reset()
		s.owned = false
		return nil, nil
	case ReqResetDevice:
		s.reset()
		return nil, nil
	case ReqGetQueueNum:
		return U64(s.info.Queues), nil
	case ReqGetMaxMemSlots:
		return U64(s.mem.MaxSlots()), nil
	case ReqSetMemTable:
		if err := s.mem.SetTable(pl.(MemTable).Regions, m.fds); err != nil {
			return nil, wrap(req, ErrInvalid, err)
		}
		return nil, nil
	case ReqAddMemReg:
		if err := s.mem.Add(pl.(MemRegion).Region, m.fds[0]); err != nil {
			return nil, wrap(req, ErrInvalid, err)
		}
		return nil, nil
	case ReqRemMemReg:
		if err := s.mem.Remove(pl.(MemRegion).Region); err != nil {
			return nil, wrap(req, ErrInvalid, err)
		}
		return nil, nil
	case ReqGetConfig:
		c := pl.(Config)
		buf := make([]byte, len(c.Data))
		if err := s.dev.GetConfig(c.Offset, buf); err != nil {
			return nil, wrap(req, ErrInvalid, err)
		}
		return Config{Offset: c.Offset, Flags: c.Flags, Data: buf}, nil
	case ReqSetConfig:
		c := pl.(Config)
		if err := s.dev.SetConfig(c.Offset, c.Data, c.Flags); err != nil {
			return nil, wrap(req, ErrInvalid, err)
		}
		return nil, nil
	case ReqSetVringKick, ReqSetVringCall, ReqSetVringErr:
		return nil, s.setVringFD(m, uint64(pl.(U64)))
	case ReqGetVringBase:
		r := s.rings[pl.(VringState).Index]
		s.stopRun(r)
		if r.kick != nil {
			r.kick.Close()
			r.kick = nil
		}
		return VringState{Index: uint32(r.index), Num: uint32(r.base)}, nil
	case ReqSetVringEnable:
		st := pl.(VringState)
		r := s.rings[st.Index]
		r.enabled = st.Num == 1
		if !r.enabled {
			s.stopRun(r)
			return nil, nil
		}
		if err := s.maybeStart(r); err != nil {
			return nil, &MessageError{Request: req, Err: err}
		}
		return nil, nil
	case ReqSetVringNum, ReqSetVringBase, ReqSetVringAddr:
		return nil, s.configureRing(req, pl)
	}
	return nil, msgErr(req, ErrUnsupported, "no handler")
}

func (s *Session) configureRing(req Request, pl Payload) error {
	var idx uint32
	switch p := pl.(type) {
	case VringState:
		idx = p.Index
	case VringAddr:
		idx = p.Index
	}
	r := s.rings[idx]
	if r.run != nil {
		return msgErr(req, ErrState, "queue %d is running", idx)
	}
	switch p := pl.(type) {
	case VringAddr:
		r.addr, r.hasAddr = p, true
	case VringState:
		if req == ReqSetVringNum {
			r.num = uint16(p.Num)
		} else {
			r.base = uint16(p.Num)
		}
	}
	return nil
}

func (s *Session) setFeatures(v uint64) error {
	if v != s.neg.acked {
		for _, r := range s.rings {
			if r.run != nil {
				return msgErr(ReqSetFeatures, ErrState, "features change from %#x to %#x while queue %d runs", s.neg.acked, v, r.index)
			}
		}
	}
	if err := s.dev.SetFeatures(v); err != nil {
		return wrap(ReqSetFeatures, ErrInvalid, err)
	}
	s.neg.acked = v
	if v&FeatureProtocolFeatures != 0 {
		return nil
	}
	// Without PROTOCOL_FEATURES there is no SET_VRING_ENABLE: every ring
	// is enabled, and runs once started.
	var first error
	for _, r := range s.rings {
		r.enabled = true
		if err := s.maybeStart(r); err != nil && first == nil {
			first = &MessageError{Request: ReqSetFeatures, Err: err}
		}
	}
	return first
}

// eventFD checks that fd is an eventfd: kick, call and err fds are read and
// written from the ring goroutines, and anything else (a pipe that fills, a
// regular file that never blocks) could stall or spin them.
func eventFD(fd int) error {
	target, err := os.Readlink("/proc/self/fd/" + strconv.Itoa(fd))
	if err != nil {
		return fmt.Errorf("%w: cannot identify fd: %v", ErrInvalid, err)
	}
	if target != "anon_inode:[eventfd]" {
		return fmt.Errorf("%w: fd is %q, not an eventfd", ErrInvalid, target)
	}
	return nil
}

// notifyFile makes the file the core signals a call or err eventfd through.
// Every write must be one non-blocking attempt: a front-end can saturate
// the eventfd's counter, and a signal that waited for room (as a write on
// a netpoller file does) would park the ring goroutine for good, with the
// device's locks held. So the *os.File is created while the descriptor is
// blocking (os.NewFile then leaves it off the netpoller: plain write
// syscalls) and O_NONBLOCK is set afterwards (the write then fails with
// EAGAIN instead of sleeping; the driver is being interrupted anyway).
// O_NONBLOCK belongs to the open file description the front-end shares; it
// ends up set, as QEMU creates these eventfds.
func notifyFile(fd int, name string) (*os.File, error) {
	flags, err := unix.FcntlInt(uintptr(fd), unix.F_GETFL, 0)
	if err == nil && flags&unix.O_NONBLOCK != 0 {
		_, err = unix.FcntlInt(uintptr(fd), unix.F_SETFL, flags&^unix.O_NONBLOCK)
	}
	if err != nil {
		unix.Close(fd)
		return nil, err
	}
	f := os.NewFile(uintptr(fd), name)
	if _, err := unix.FcntlInt(uintptr(fd), unix.F_SETFL, flags|unix.O_NONBLOCK); err != nil {
		f.Close()
		return nil, err
	}
	return f, nil
}

func (s *Session) setVringFD(m *msg, v uint64) error {
	req := m.h.Request
	r := s.rings[v&VringIndexMask]
	fd := -1
	if v&VringNoFD == 0 {
		if err := eventFD(m.fds[0]); err != nil {
			return &MessageError{Request: req, Err: err}
		}
		fd = m.take(0)
	}
	switch req {
	case ReqSetVringKick:
		if fd < 0 {
			return msgErr(req, ErrUnsupported, "queue %d: polling mode (no kick fd) is not supported", r.index)
		}
		k, err := virtq.NewKicker(fd)
		if err != nil {
			return wrap(req, ErrInvalid, err)
		}
		s.stopRun(r)
		if r.kick != nil {
			r.kick.Close()
		}
		r.kick = k
		if err := s.maybeStart(r); err != nil {
			return &MessageError{Request: req, Err: err}
		}
	case ReqSetVringCall:
		var f *os.File
		if fd >= 0 {
			var err error
			if f, err = notifyFile(fd, "vring-call"); err != nil {
				return wrap(req, ErrInvalid, err)
			}
		}
		old := r.call
		r.call = f
		if r.run != nil {
			r.run.q.SetCall(f)
		}
		if old != nil {
			old.Close() // a concurrent signal on it fails harmlessly
		}
	case ReqSetVringErr:
		var f *os.File
		if fd >= 0 {
			var err error
			if f, err = notifyFile(fd, "vring-err"); err != nil {
				return wrap(req, ErrInvalid, err)
			}
		}
		if old := r.errf.Swap(f); old != nil {
			old.Close()
		}
	}
	return nil
}

// maybeStart starts r if it is started (has a kick fd), enabled and not yet
// running. The ring areas must be mapped now.
func (s *Session) maybeStart(r *ring) error {
	if r.run != nil || r.kick == nil || !r.enabled {
		return nil
	}
	if r.num == 0 || !r.hasAddr {
		return fmt.Errorf("%w: queue %d started before its size and addresses were set", ErrState, r.index)
	}
	cfg := virtq.Config{
		Index:     r.index,
		Size:      r.num,
		Desc:      r.addr.Desc,
		Avail:     r.addr.Avail,
		Used:      r.addr.Used,
		LastAvail: r.base,
		EventIdx:  s.neg.acked&FeatureEventIdx != 0,
		Indirect:  s.neg.acked&FeatureIndirectDesc != 0,
	}
	// A stopped Kicker keeps its past deadline; clear it for the new run.
	if err := r.kick.File().SetReadDeadline(time.Time{}); err != nil {
		return fmt.Errorf("%w: queue %d kick fd: %v", ErrInvalid, r.index, err)
	}
	q, err := virtq.New(s.mem, cfg)
	if err != nil {
		return fmt.Errorf("%w: %w", ErrInvalid, err)
	}
	q.SetCall(r.call)
	if err := s.dev.QueueStart(r.index, q); err != nil {
		q.Close()
		return fmt.Errorf("%w: device refused queue %d: %w", ErrInvalid, r.index, err)
	}
	ru := &run{ring: r, q: q, kick: r.kick, done: make(chan struct{})}
	s.mu.Lock()
	r.run = ru
	s.mu.Unlock()
	s.inc(cRingsStarted)
	s.srv.trace(Event{Session: s.id, Kind: EventRingStart, Queue: r.index})
	go s.work(ru)
	return nil
}

// stopRun stops r's run, if any, and records its last avail index in
// r.base. It never waits for a kick: the kicker's deadline wakes the
// goroutine, which at most finishes the Kick in progress.
func (s *Session) stopRun(r *ring) {
	ru := r.run
	if ru == nil {
		return
	}
	s.mu.Lock()
	r.run = nil
	ru.stopping = true
	ru.halt.Store(true)
	s.mu.Unlock()
	ru.kick.Stop()
	<-ru.done
	if !ru.devStopped {
		s.dev.QueueStop(r.index)
	}
	r.base = ru.q.Stop()
	ru.q.Close()
	s.inc(cRingsStopped)
	s.srv.trace(Event{Session: s.id, Kind: EventRingStop, Queue: r.index})
}

// work is a ring's goroutine: it calls Kick once, then after each kick,
// until the ring is stopped or breaks.
func (s *Session) work(ru *run) {
	defer close(ru.done)
	idx := ru.ring.index
	var err error
	for {
		more, kerr := s.dev.Kick(idx)
		if kerr != nil {
			err = kerr
			break
		}
		if ru.halt.Load() {
			if s.halted(ru) {
				return
			}
		}
		if more {
			continue
		}
		if werr := ru.kick.Wait(); werr != nil {
			if errors.Is(werr, virtq.ErrStopped) && s.halted(ru) {
				return
			}
			err = fmt.Errorf("kick eventfd: %w", werr)
			break
		}
		s.inc(cKicks)
	}
	s.breakRings(ru, err)
}

// halted reports whether ru must end, finishing a break another ring's
// goroutine found.
func (s *Session) halted(ru *run) bool {
	s.mu.Lock()
	stopping, broken := ru.stopping, ru.broken
	s.mu.Unlock()
	if broken != nil {
		s.finishBroken(ru, broken)
		return true
	}
	return stopping
}

// breakRings breaks ru's ring after its Kick failed with cause, and every
// other running ring of the session whose queue the driver corrupted (a
// device often finds another ring's corruption, as echo and vsock do when
// tx processing pops rx buffers).
func (s *Session) breakRings(ru *run, cause error) {
	own := &RingError{Queue: ru.ring.index, Err: cause}
	if qerr := ru.q.Err(); qerr != nil {
		own.Err = qerr
	}
	s.mu.Lock()
	for _, r := range s.rings {
		o := r.run
		if o == nil || o == ru || o.stopping || o.broken != nil {
			continue
		}
		if qerr := o.q.Err(); qerr != nil {
			o.broken = &RingError{Queue: r.index, Err: qerr}
			o.halt.Store(true)
			o.kick.Stop()
		}
	}
	s.mu.Unlock()
	s.finishBroken(ru, own)
}

// finishBroken ends a broken run on its own goroutine: the device lets go
// of the queue, the front-end hears of it once through the err eventfd, and
// the ring stays stopped until the front-end sets it up again.
func (s *Session) finishBroken(ru *run, err error) {
	s.dev.QueueStop(ru.ring.index)
	ru.devStopped = true
	if f := ru.ring.errf.Load(); f != nil {
		virtq.Signal(f)
	}
	s.inc(cRingsBroken)
	s.srv.trace(Event{Session: s.id, Kind: EventRingBroken, Queue: ru.ring.index, Err: err})
}

// reset stops every ring, forgets ring configuration and fds, and resets the
// device (RESET_DEVICE, RESET_OWNER). Memory and protocol features stay:
// they describe the connection, not the device.
func (s *Session) reset() {
	s.releaseRings()
	s.dev.Reset()
	s.neg.acked = 0
}

func (s *Session) releaseRings() {
	for _, r := range s.rings {
		s.stopRun(r)
		if r.kick != nil {
			r.kick.Close()
		}
		if r.call != nil {
			r.call.Close()
		}
		if f := r.errf.Swap(nil); f != nil {
			f.Close()
		}
		r.num, r.addr, r.hasAddr, r.base, r.kick, r.call, r.enabled = 0, VringAddr{}, false, 0, nil, nil, false
	}
}

// teardown frees everything the front-end had: rings stopped (goroutines
// gone), fds closed, memory unmapped once the last queue lets go, device
// closed.
func (s *Session) teardown() {
	if s.dev != nil {
		s.releaseRings()
		_ = s.dev.Close()
	}
	if s.mem != nil {
		s.mem.Close()
	}
	_ = s.conn.Close()
}
