package virtiofs

import (
	"encoding/binary"
	"syscall"
	"time"

	"github.com/hanwen/go-fuse/v2/fuse"
)

// header is the part of fuse_in_header the device checks.
type header struct {
	length uint32
	opcode uint32
	unique uint64
}

func parseHeader(b []byte) header {
	return header{
		length: binary.LittleEndian.Uint32(b[0:]),
		opcode: binary.LittleEndian.Uint32(b[4:]),
		unique: binary.LittleEndian.Uint64(b[8:]),
	}
}

// handle serves one request chain: in is its device-readable part, out its
// device-writable part (both guest memory). It returns the bytes written
// into out (the used length), or -1 when w's ring stopped before the
// request started (the chain must be discarded).
//
// The fixed part of the request (header and opcode struct, at most
// maxArgs bytes) is copied once; every check reads that copy and go-fuse
// parses the same copy, so the guest cannot change what was checked.
// Payloads (names, WRITE data) stay in guest memory.
func (d *Device) handle(in, out [][]byte, hiprio bool, w *work) int {
	rlen := iovLen(in)
	out = clip(out, d.limit)
	wlen := iovLen(out)
	var fixed [maxArgs]byte
	k := copyIn(fixed[:min(rlen, maxArgs)], in)
	if k < InHeaderSize {
		var u uint64
		if k >= 16 {
			u = binary.LittleEndian.Uint64(fixed[8:])
		}
		return d.reject(out, u, syscall.EINVAL, true)
	}
	h := parseHeader(fixed[:])
	switch {
	case int64(h.length) != int64(rlen):
		return d.reject(out, h.unique, syscall.EINVAL, true)
	case rlen > d.limit:
		return d.reject(out, h.unique, syscall.E2BIG, true)
	}
	need, known := argSize[h.opcode]
	switch {
	case !known:
		d.count(func(s *Stats) { s.Unsupported++ })
		return d.reject(out, h.unique, syscall.ENOSYS, false)
	case hiprio != hiprioOp(h.opcode) && (hiprio || h.opcode == OpInterrupt):
		// hiprio carries only FORGET, BATCH_FORGET and INTERRUPT; an
		// INTERRUPT on a request ring could wait behind the request it
		// interrupts. FORGET on a request ring is harmless and served.
		return d.reject(out, h.unique, syscall.EINVAL, true)
	}
	// Requests without a reply (and INTERRUPT, answered only on failure)
	// may come without room for one: go-fuse still needs somewhere to
	// write, and nothing reaches the guest.
	var scratch [OutHeaderSize]byte
	replyTo := out
	if wlen < OutHeaderSize {
		if !hiprioOp(h.opcode) {
			return d.reject(out, h.unique, syscall.EINVAL, true) // nowhere to answer
		}
		replyTo = [][]byte{scratch[:]}
	}
	if h.opcode == OpInit {
		if w != nil && !d.begin(w, h.unique) {
			return -1
		}
		return d.init(fixed[:k], in, replyTo, out, h)
	}
	d.initMu.RLock()
	defer d.initMu.RUnlock()
	s := d.sess.Load()
	switch {
	case h.opcode == OpRename && s.renameSwap:
		need = size[fuse.RenameIn]()
	case h.opcode == OpSetXAttr && s.setxattrExt:
		need = size[fuse.SetXAttrIn]()
	}
	if rlen < need {
		return d.reject(out, h.unique, syscall.EINVAL, true)
	}
	if h.opcode == OpWrite {
		// fuse_write_in.size must match the payload: go-fuse hands the
		// filesystem the whole payload whatever size says.
		if int64(binary.LittleEndian.Uint32(fixed[56:])) != int64(rlen-need) {
			return d.reject(out, h.unique, syscall.EINVAL, true)
		}
	}
	if w != nil && !d.begin(w, h.unique) {
		return -1
	}
	n, st := s.ps.HandleRequest(withFixed(fixed[:need], in), replyTo)
	return d.result(out, wlen, h.unique, n, st)
}

// init serves FUSE_INIT, which starts a session: it runs alone (go-fuse
// rewrites its session state), so it is refused with EBUSY when other
// requests keep running for longer than initWait.
func (d *Device) init(fixed []byte, in, replyTo, out [][]byte, h header) int {
	if len(fixed) < initCompatInSize {
		return d.reject(out, h.unique, syscall.EINVAL, true)
	}
	major := binary.LittleEndian.Uint32(fixed[InHeaderSize:])
	minor := binary.LittleEndian.Uint32(fixed[InHeaderSize+4:])
	if major != fuseMajor || minor < fuseMinMinor {
		// go-fuse would report this on the process-wide logger.
		return d.reject(out, h.unique, syscall.EPROTO, true)
	}
	flags := binary.LittleEndian.Uint32(fixed[InHeaderSize+12:])
	deadline := time.Now().Add(initWait)
	for !d.initMu.TryLock() {
		if time.Now().After(deadline) {
			d.count(func(s *Stats) { s.InitBusy++ })
			return d.reject(out, h.unique, syscall.EBUSY, false)
		}
		time.Sleep(time.Millisecond)
	}
	defer d.initMu.Unlock()
	s := d.sess.Load()
	n, st := s.ps.HandleRequest(withFixed(fixed, in), replyTo)
	if st.Ok() {
		m := d.mount
		ns := &session{
			ps:         s.ps,
			renameSwap: flags&fuse.CAP_RENAME_SWAP != 0,
			setxattrExt: flags&fuse.CAP_SETXATTR_EXT != 0 &&
				m.ExtraCapabilities&fuse.CAP_SETXATTR_EXT != 0 &&
				m.DisabledCapabilities&fuse.CAP_SETXATTR_EXT == 0,
		}
		d.sess.CompareAndSwap(s, ns) // a Reset meanwhile wins
	}
	return d.result(out, iovLen(out), h.unique, n, st)
}

// result turns go-fuse's answer into the used length: a failure go-fuse
// did not answer itself (no room for the reply, a request too short) gets
// an error reply from the device.
func (d *Device) result(out [][]byte, wlen int, unique uint64, n int, st fuse.Status) int {
	if !st.Ok() {
		return d.reject(out, unique, syscall.Errno(st), false)
	}
	if wlen < OutHeaderSize {
		return 0 // a reply-less request served with scratch room
	}
	return n
}

// reject answers a request with errno when out has room for a reply
// header, and returns the used length. bad counts a malformed chain.
func (d *Device) reject(out [][]byte, unique uint64, errno syscall.Errno, bad bool) int {
	n := 0
	if iovLen(out) >= OutHeaderSize {
		var b [OutHeaderSize]byte
		binary.LittleEndian.PutUint32(b[0:], OutHeaderSize)
		binary.LittleEndian.PutUint32(b[4:], uint32(-int32(errno)))
		binary.LittleEndian.PutUint64(b[8:], unique)
		n = copyOut(out, b[:])
	}
	d.count(func(s *Stats) {
		if bad {
			s.BadChains++
		}
		if n > 0 {
			s.ErrorReplies++
		}
	})
	return n
}

// encodeInterrupt builds a FUSE_INTERRUPT for unique (sent by the device
// itself when it stops).
func encodeInterrupt(unique uint64) []byte {
	b := make([]byte, InHeaderSize+8)
	binary.LittleEndian.PutUint32(b[0:], uint32(len(b)))
	binary.LittleEndian.PutUint32(b[4:], OpInterrupt)
	binary.LittleEndian.PutUint64(b[8:], ^unique) // its own unique, unlike any guest's in flight
	binary.LittleEndian.PutUint64(b[InHeaderSize:], unique)
	return b
}

// --- iovecs ---

func iovLen(v [][]byte) int {
	n := 0
	for _, b := range v {
		n += len(b)
	}
	return n
}

// copyIn fills dst from the start of v and returns the bytes copied.
func copyIn(dst []byte, v [][]byte) int {
	n := 0
	for _, b := range v {
		if n == len(dst) {
			break
		}
		n += copy(dst[n:], b)
	}
	return n
}

// copyOut writes src at the start of v and returns the bytes written.
func copyOut(v [][]byte, src []byte) int {
	n := 0
	for _, b := range v {
		if n == len(src) {
			break
		}
		n += copy(b, src[n:])
	}
	return n
}

// clip returns v cut to at most limit bytes.
func clip(v [][]byte, limit int) [][]byte {
	left := limit
	for i, b := range v {
		if len(b) >= left {
			if len(b) == left && i == len(v)-1 {
				return v
			}
			r := make([][]byte, i+1)
			copy(r, v[:i])
			r[i] = b[:left]
			return r
		}
		left -= len(b)
	}
	return v
}

// withFixed returns the request as go-fuse gets it: the device's copy of
// the first len(fixed) bytes, then the rest of v as the guest's own
// segments.
func withFixed(fixed []byte, v [][]byte) [][]byte {
	r := make([][]byte, 1, len(v)+1)
	r[0] = fixed
	skip := len(fixed)
	for _, b := range v {
		if skip >= len(b) {
			skip -= len(b)
			continue
		}
		r = append(r, b[skip:])
		skip = 0
	}
	return r
}
