package vhosttest

import (
	"bytes"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"os"
	"sync"
	"syscall"

	"github.com/vsdp/vsdp/vhost"
	"github.com/vsdp/vsdp/vhost/guestmem"
)

// A Trace is a recorded vhost-user conversation between a real front-end
// (QEMU) and a back-end: every request with its flags, payload and fd
// count, and every reply. Front-end addresses (region userspace_addr, ring
// addresses) are stored relative to the memory regions, as
// (region number << 48 | offset) with region numbers from 1, so a replay
// can map its own memory anywhere; fds are stored as counts.
type Trace struct {
	Source string     `json:"source"` // what was recorded (QEMU version, guest, actions)
	Msgs   []TraceMsg `json:"msgs"`
}

// TraceMsg is one message of a Trace.
type TraceMsg struct {
	Reply   bool   `json:"reply,omitempty"` // back-end to front-end
	Request string `json:"request"`         // the request's name, for readers
	Code    uint32 `json:"code"`
	Flags   uint32 `json:"flags"`
	Payload string `json:"payload"` // hex; addresses region-relative
	FDs     int    `json:"fds,omitempty"`
	Note    string `json:"note,omitempty"` // an action of the recorder (e.g. "guest: rmmod")
}

// LoadTrace reads a trace file.
func LoadTrace(path string) (*Trace, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var t Trace
	if err := json.Unmarshal(b, &t); err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return &t, nil
}

// Save writes the trace as indented JSON.
func (t *Trace) Save(path string) error {
	b, err := json.MarshalIndent(t, "", "  ")
	if err != nil {
		return err
	}
	return os.WriteFile(path, append(b, '\n'), 0o644)
}

// Requests returns the front-end requests in order (names), for checks on
// what QEMU sends.
func (t *Trace) Requests() []string {
	var out []string
	for _, m := range t.Msgs {
		if !m.Reply && m.Note == "" {
			out = append(out, m.Request)
		}
	}
	return out
}

// uvaFields lists the payload offsets of front-end addresses per request.
func uvaFields(req vhost.Request, payload []byte) []int {
	switch req {
	case vhost.ReqSetMemTable:
		if len(payload) < 8 {
			return nil
		}
		n := int(binary.NativeEndian.Uint32(payload))
		var offs []int
		for i := 0; i < n && 8+32*i+32 <= len(payload); i++ {
			offs = append(offs, 8+32*i+16)
		}
		return offs
	case vhost.ReqAddMemReg, vhost.ReqRemMemReg:
		if len(payload) >= 40 {
			return []int{24}
		}
	case vhost.ReqSetVringAddr:
		if len(payload) >= 40 {
			return []int{8, 16, 24}
		}
	}
	return nil
}

// regionsOf returns the regions a memory message names.
func regionsOf(req vhost.Request, p []byte) []guestmem.RegionSpec {
	ne := binary.NativeEndian
	rd := func(b []byte) guestmem.RegionSpec {
		return guestmem.RegionSpec{GPA: guestmem.GPA(ne.Uint64(b)), Size: ne.Uint64(b[8:]), UVA: guestmem.UVA(ne.Uint64(b[16:])), MmapOffset: ne.Uint64(b[24:])}
	}
	switch req {
	case vhost.ReqSetMemTable:
		var out []guestmem.RegionSpec
		if len(p) < 8 {
			return nil
		}
		n := int(ne.Uint32(p))
		for i := 0; i < n && 8+32*i+32 <= len(p); i++ {
			out = append(out, rd(p[8+32*i:]))
		}
		return out
	case vhost.ReqAddMemReg, vhost.ReqRemMemReg:
		if len(p) >= 40 {
			return []guestmem.RegionSpec{rd(p[8:])}
		}
	}
	return nil
}

// normalizer rewrites front-end addresses to region-relative ones, keeping
// the regions in the order they first appeared.
type normalizer struct {
	regions []guestmem.RegionSpec // by first appearance
}

func (n *normalizer) index(s guestmem.RegionSpec) int {
	for i, r := range n.regions {
		if r.GPA == s.GPA && r.Size == s.Size && r.UVA == s.UVA {
			return i
		}
	}
	n.regions = append(n.regions, s)
	return len(n.regions) - 1
}

func (n *normalizer) rewrite(req vhost.Request, p []byte) []byte {
	p = append([]byte(nil), p...)
	for _, r := range regionsOf(req, p) {
		n.index(r)
	}
	for _, off := range uvaFields(req, p) {
		uva := binary.NativeEndian.Uint64(p[off:])
		for i, r := range n.regions {
			if uva >= uint64(r.UVA) && uva-uint64(r.UVA) < r.Size {
				binary.NativeEndian.PutUint64(p[off:], uint64(i+1)<<48|(uva-uint64(r.UVA)))
				break
			}
		}
	}
	return p
}

// Recorder is a Unix-socket proxy between a front-end and a back-end that
// records their conversation.
type Recorder struct {
	l       *net.UnixListener
	backend string

	mu   sync.Mutex
	norm normalizer
	msgs []TraceMsg
	wg   sync.WaitGroup
}

// NewRecorder listens on path and forwards each connection to the back-end
// socket at backend.
func NewRecorder(path, backend string) (*Recorder, error) {
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		return nil, err
	}
	r := &Recorder{l: l, backend: backend}
	r.wg.Add(1)
	go r.accept()
	return r, nil
}

// Note records an action between messages (what the guest did).
func (r *Recorder) Note(s string) {
	r.mu.Lock()
	r.msgs = append(r.msgs, TraceMsg{Note: s})
	r.mu.Unlock()
}

// Trace returns what was recorded so far.
func (r *Recorder) Trace(source string) *Trace {
	r.mu.Lock()
	defer r.mu.Unlock()
	return &Trace{Source: source, Msgs: append([]TraceMsg(nil), r.msgs...)}
}

// Close stops listening and waits for the proxied connections to end.
func (r *Recorder) Close() {
	r.l.Close()
	r.wg.Wait()
}

func (r *Recorder) accept() {
	defer r.wg.Done()
	for {
		fe, err := r.l.AcceptUnix()
		if err != nil {
			return
		}
		be, err := net.DialUnix("unix", nil, &net.UnixAddr{Name: r.backend, Net: "unix"})
		if err != nil {
			fe.Close()
			continue
		}
		r.wg.Add(2)
		go func() { defer r.wg.Done(); r.pipe(fe, be, false); be.CloseWrite() }()
		go func() { defer r.wg.Done(); r.pipe(be, fe, true); fe.Close(); be.Close() }()
	}
}

// pipe forwards whole messages from src to dst, recording each.
func (r *Recorder) pipe(src, dst *net.UnixConn, reply bool) {
	hdr := make([]byte, vhost.HeaderSize)
	oob := make([]byte, syscall.CmsgSpace(4*vhost.MaxFDs))
	for {
		n, oobn, _, _, err := src.ReadMsgUnix(hdr, oob)
		if err != nil || n == 0 {
			return
		}
		if n < len(hdr) {
			if _, err := io.ReadFull(src, hdr[n:]); err != nil {
				return
			}
		}
		var fds []int
		if oobn > 0 {
			if cms, err := syscall.ParseSocketControlMessage(oob[:oobn]); err == nil {
				for _, cm := range cms {
					if f, err := syscall.ParseUnixRights(&cm); err == nil {
						fds = append(fds, f...)
					}
				}
			}
		}
		h, err := vhost.ParseHeader(hdr)
		if err != nil || h.Size > vhost.MaxPayload {
			closeFDs(fds)
			return
		}
		payload := make([]byte, h.Size)
		if _, err := io.ReadFull(src, payload); err != nil {
			closeFDs(fds)
			return
		}
		r.mu.Lock()
		r.msgs = append(r.msgs, TraceMsg{Reply: reply, Request: h.Request.String(), Code: uint32(h.Request), Flags: h.Flags,
			Payload: hex.EncodeToString(r.norm.rewrite(h.Request, payload)), FDs: len(fds)})
		r.mu.Unlock()
		msg := append(append([]byte(nil), hdr...), payload...)
		var rights []byte
		if len(fds) > 0 {
			rights = syscall.UnixRights(fds...)
		}
		_, _, err = dst.WriteMsgUnix(msg, rights, nil)
		closeFDs(fds)
		if err != nil {
			return
		}
	}
}

func closeFDs(fds []int) {
	for _, fd := range fds {
		syscall.Close(fd)
	}
}

// Mismatch is a reply that differs between the trace and a replay.
type Mismatch struct {
	Index    int
	Request  string
	Recorded string
	Got      string
}

func (m Mismatch) String() string {
	return fmt.Sprintf("message %d (%s): recorded reply %s, replay %s", m.Index, m.Request, m.Recorded, m.Got)
}

// Replay sends the trace's requests to a back-end through f, substituting
// its own memfds (one GuestMemory per recorded region, at the recorded
// GPA and size) and eventfds, and compares the back-end's replies with the
// recorded ones. GET_VRING_BASE replies are compared by ring index only:
// the avail index depends on what the recorded guest did.
func Replay(f *Frontend, t *Trace) ([]Mismatch, error) {
	var mems []*GuestMemory
	var files []*os.File
	defer func() {
		for _, m := range mems {
			m.Close()
		}
		for _, x := range files {
			x.Close()
		}
	}()
	memFor := func(i int, spec guestmem.RegionSpec) (*GuestMemory, error) {
		for len(mems) <= i {
			mems = append(mems, nil)
		}
		if mems[i] == nil {
			m, err := NewGuestMemoryOpts(spec.Size, GuestMemoryOptions{Base: spec.GPA, UVA: UVABase + guestmem.UVA(i)<<36})
			if err != nil {
				return nil, err
			}
			mems[i] = m
		}
		return mems[i], nil
	}
	var out []Mismatch
	for i, m := range t.Msgs {
		if m.Note != "" {
			continue
		}
		payload, err := hex.DecodeString(m.Payload)
		if err != nil {
			return out, fmt.Errorf("message %d: %w", i, err)
		}
		req := vhost.Request(m.Code)
		if m.Reply {
			h, got, err := f.ReadReply()
			if err != nil {
				return out, fmt.Errorf("message %d (%s): %w", i, m.Request, err)
			}
			if h.Request != req {
				out = append(out, Mismatch{i, m.Request, m.Request, h.Request.String()})
				continue
			}
			want := payload
			if req == vhost.ReqGetVringBase && len(got) >= 4 && len(want) >= 4 {
				got, want = got[:4], want[:4]
			}
			if !bytes.Equal(got, want) {
				out = append(out, Mismatch{i, m.Request, hex.EncodeToString(want), hex.EncodeToString(got)})
			}
			continue
		}
		// Rewrite region-relative addresses to this replay's memory.
		regions := regionsOf(req, payload)
		var fds []int
		for _, off := range uvaFields(req, payload) {
			v := binary.NativeEndian.Uint64(payload[off:])
			idx := int(v>>48) - 1
			if idx < 0 {
				continue
			}
			spec := guestmem.RegionSpec{}
			if req == vhost.ReqSetVringAddr {
				if idx >= len(mems) || mems[idx] == nil {
					return out, fmt.Errorf("message %d: ring in region %d never given", i, idx+1)
				}
				binary.NativeEndian.PutUint64(payload[off:], uint64(mems[idx].Spec().UVA)+v&(1<<48-1))
				continue
			}
			for _, r := range regions {
				if uint64(r.UVA) == v {
					spec = r
				}
			}
			gm, err := memFor(idx, spec)
			if err != nil {
				return out, err
			}
			binary.NativeEndian.PutUint64(payload[off:], uint64(gm.Spec().UVA))
			binary.NativeEndian.PutUint64(payload[off+8:], 0) // mmap_offset: our memfd starts at the region
			if req != vhost.ReqRemMemReg {
				fds = append(fds, gm.Fd())
			}
		}
		for len(fds) < m.FDs {
			e, err := NewEventFD()
			if err != nil {
				return out, err
			}
			files = append(files, e)
			fds = append(fds, int(e.Fd()))
		}
		if err := f.Send(req, m.Flags, payload, fds[:m.FDs]...); err != nil {
			return out, fmt.Errorf("message %d (%s): %w", i, m.Request, err)
		}
	}
	return out, nil
}
