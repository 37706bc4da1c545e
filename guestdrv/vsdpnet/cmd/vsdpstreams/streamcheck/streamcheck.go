package streamcheck

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"hash"
	"io"
	"net"
	"strconv"
	"strings"
	"sync"
	"time"
)

// Limits.
const (
	HeaderSize = 32
	MaxSize    = 2 << 20 // bytes per stream and direction
	MaxStreams = 1024    // streams in a plan
)

var magic = [4]byte{'V', 'S', 'C', '1'}

// Errors.
var (
	// ErrHeader: a header or a report line is malformed or out of range.
	ErrHeader = errors.New("streamcheck: bad header")
	// ErrData: the bytes received are not the ones the header announced
	// (wrong content, too few, too many). Returned as a *DataError.
	ErrData = errors.New("streamcheck: bad data")
	// ErrPlan: a plan's parameters are out of range.
	ErrPlan = errors.New("streamcheck: bad plan")
)

// Dir is a direction of a stream.
type Dir int

// Directions.
const (
	Up   Dir = iota // client to server
	Down            // server to client
)

func (d Dir) String() string {
	if d == Up {
		return "up"
	}
	return "down"
}

// DataError says where received data went wrong.
type DataError struct {
	Index  uint32
	Dir    Dir
	Offset uint64 // first wrong byte, or the length where data ended
	Reason string
}

func (e *DataError) Error() string {
	return fmt.Sprintf("streamcheck: stream %d %s: %s at offset %d", e.Index, e.Dir, e.Reason, e.Offset)
}

func (e *DataError) Unwrap() error { return ErrData }

// Header opens a stream.
type Header struct {
	Index    uint32
	Seed     uint64
	Up, Down uint64
}

// Marshal encodes h.
func (h Header) Marshal() [HeaderSize]byte {
	var b [HeaderSize]byte
	copy(b[:4], magic[:])
	binary.BigEndian.PutUint32(b[4:], h.Index)
	binary.BigEndian.PutUint64(b[8:], h.Seed)
	binary.BigEndian.PutUint64(b[16:], h.Up)
	binary.BigEndian.PutUint64(b[24:], h.Down)
	return b
}

// ParseHeader decodes and checks a header.
func ParseHeader(b []byte) (Header, error) {
	if len(b) != HeaderSize {
		return Header{}, fmt.Errorf("%w: %d bytes, want %d", ErrHeader, len(b), HeaderSize)
	}
	if !bytes.Equal(b[:4], magic[:]) {
		return Header{}, fmt.Errorf("%w: magic %q", ErrHeader, b[:4])
	}
	h := Header{
		Index: binary.BigEndian.Uint32(b[4:]),
		Seed:  binary.BigEndian.Uint64(b[8:]),
		Up:    binary.BigEndian.Uint64(b[16:]),
		Down:  binary.BigEndian.Uint64(b[24:]),
	}
	if err := h.check(); err != nil {
		return Header{}, err
	}
	return h, nil
}

func (h Header) check() error {
	for _, n := range []uint64{h.Up, h.Down} {
		if n < 1 || n > MaxSize {
			return fmt.Errorf("%w: size %d outside 1..%d", ErrHeader, n, MaxSize)
		}
	}
	return nil
}

// splitmix64 advances *s and returns its next output.
func splitmix64(s *uint64) uint64 {
	*s += 0x9E3779B97F4A7C15
	z := *s
	z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9
	z = (z ^ (z >> 27)) * 0x94D049BB133111EB
	return z ^ (z >> 31)
}

// pick draws one size: a power of two 2^e (e in 0..20) plus a random part
// below it, at most MaxSize, so sizes spread evenly over magnitudes.
func pick(s *uint64) uint64 {
	r := splitmix64(s)
	base := uint64(1) << (r % 21)
	return min(base+(r>>32)%base, MaxSize)
}

// Plan returns the headers of n streams for seed. Each direction's sizes
// add up to at most budget bytes (budget >= n: every stream carries at
// least a byte each way).
func Plan(seed uint64, n int, budget uint64) ([]Header, error) {
	if n < 1 || n > MaxStreams {
		return nil, fmt.Errorf("%w: %d streams outside 1..%d", ErrPlan, n, MaxStreams)
	}
	if budget < uint64(n) {
		return nil, fmt.Errorf("%w: budget %d below %d streams", ErrPlan, budget, n)
	}
	s := seed
	var usedUp, usedDown uint64
	hs := make([]Header, n)
	for i := range hs {
		up, down := pick(&s), pick(&s)
		switch i {
		case 0:
			up, down = 1, MaxSize
		case 1:
			up, down = MaxSize, 1
		}
		rest := uint64(n - 1 - i) // a byte each for the streams after this one
		up = min(up, budget-usedUp-rest)
		down = min(down, budget-usedDown-rest)
		usedUp += up
		usedDown += down
		hs[i] = Header{Index: uint32(i), Seed: seed, Up: up, Down: down}
	}
	return hs, nil
}

// Gen produces a stream's content in one direction.
type Gen struct {
	s   uint64
	buf [8]byte
	off int // bytes of buf already used
}

// NewGen returns the generator of stream index's bytes in direction d.
func NewGen(seed uint64, index uint32, d Dir) *Gen {
	return &Gen{s: seed ^ ((uint64(index)*2 + uint64(d) + 1) * 0xD1B54A32D192ED03), off: 8}
}

// Fill fills p with the next bytes.
func (g *Gen) Fill(p []byte) {
	for len(p) > 0 {
		if g.off == 8 {
			binary.LittleEndian.PutUint64(g.buf[:], splitmix64(&g.s))
			g.off = 0
		}
		n := copy(p, g.buf[g.off:])
		g.off += n
		p = p[n:]
	}
}

// Sum returns the SHA-256 of the first n bytes of a stream's content.
func Sum(seed uint64, index uint32, d Dir, n uint64) [32]byte {
	g, h := NewGen(seed, index, d), sha256.New()
	buf := make([]byte, 64<<10)
	for n > 0 {
		k := min(n, uint64(len(buf)))
		g.Fill(buf[:k])
		h.Write(buf[:k])
		n -= k
	}
	var s [32]byte
	h.Sum(s[:0])
	return s
}

// Report is what one end saw of one stream.
type Report struct {
	Header
	UpSum, DownSum [32]byte // SHA-256 of the bytes sent or received each way
	Local, Remote  string   // this end's and the peer's addresses
}

// String formats r as a report line.
func (r Report) String() string {
	return fmt.Sprintf("stream=%d up=%d down=%d up_sha256=%x down_sha256=%x local=%s remote=%s",
		r.Index, r.Up, r.Down, r.UpSum, r.DownSum, r.Local, r.Remote)
}

// ParseReport parses a report line (String's format; the seed is not in
// it). Every field must be present once.
func ParseReport(line string) (Report, error) {
	var r Report
	bad := func(why string) (Report, error) {
		return Report{}, fmt.Errorf("%w: report %q: %s", ErrHeader, line, why)
	}
	seen := map[string]bool{}
	for _, f := range strings.Fields(line) {
		k, v, ok := strings.Cut(f, "=")
		if !ok || seen[k] {
			return bad("field " + strconv.Quote(f))
		}
		seen[k] = true
		var err error
		switch k {
		case "stream":
			var n uint64
			n, err = strconv.ParseUint(v, 10, 32)
			r.Index = uint32(n)
		case "up":
			r.Up, err = strconv.ParseUint(v, 10, 64)
		case "down":
			r.Down, err = strconv.ParseUint(v, 10, 64)
		case "up_sha256":
			err = parseSum(v, &r.UpSum)
		case "down_sha256":
			err = parseSum(v, &r.DownSum)
		case "local":
			r.Local = v
		case "remote":
			r.Remote = v
		default:
			return bad("unknown field " + strconv.Quote(k))
		}
		if err != nil {
			return bad(err.Error())
		}
	}
	if len(seen) != 7 {
		return bad("missing fields")
	}
	if err := r.check(); err != nil {
		return Report{}, err
	}
	return r, nil
}

func parseSum(v string, dst *[32]byte) error {
	b, err := hex.DecodeString(v)
	if err != nil || len(b) != 32 {
		return fmt.Errorf("bad sha256 %q", v)
	}
	copy(dst[:], b)
	return nil
}

// ParseReports collects the report lines of a program's output (other
// lines are skipped), keyed by stream index; a stream reported twice is an
// error.
func ParseReports(out string) (map[uint32]Report, error) {
	rs := map[uint32]Report{}
	for line := range strings.Lines(out) {
		if !strings.HasPrefix(line, "stream=") {
			continue
		}
		r, err := ParseReport(line)
		if err != nil {
			return nil, err
		}
		if _, dup := rs[r.Index]; dup {
			return nil, fmt.Errorf("%w: stream %d reported twice", ErrHeader, r.Index)
		}
		rs[r.Index] = r
	}
	return rs, nil
}

// verifier checks received bytes against a generator and hashes them.
type verifier struct {
	index uint32
	dir   Dir
	gen   *Gen
	hash  hash.Hash
	want  []byte
	off   uint64
}

func newVerifier(h Header, d Dir) *verifier {
	return &verifier{index: h.Index, dir: d, gen: NewGen(h.Seed, h.Index, d), hash: sha256.New()}
}

func (v *verifier) check(p []byte) error {
	if cap(v.want) < len(p) {
		v.want = make([]byte, len(p))
	}
	w := v.want[:len(p)]
	v.gen.Fill(w)
	if !bytes.Equal(p, w) {
		i := 0
		for p[i] == w[i] {
			i++
		}
		return &DataError{Index: v.index, Dir: v.dir, Offset: v.off + uint64(i), Reason: fmt.Sprintf("byte %#02x, want %#02x", p[i], w[i])}
	}
	v.hash.Write(p)
	v.off += uint64(len(p))
	return nil
}

func (v *verifier) sum() (s [32]byte) {
	v.hash.Sum(s[:0])
	return s
}

// receive reads exactly n bytes of direction d from r, checking them.
func receive(r io.Reader, h Header, d Dir, n uint64) ([32]byte, error) {
	v := newVerifier(h, d)
	buf := make([]byte, 64<<10)
	for v.off < n {
		k, err := r.Read(buf[:min(uint64(len(buf)), n-v.off)])
		if k > 0 {
			if err := v.check(buf[:k]); err != nil {
				return [32]byte{}, err
			}
		}
		if err == io.EOF {
			return [32]byte{}, &DataError{Index: h.Index, Dir: d, Offset: v.off, Reason: fmt.Sprintf("EOF, want %d bytes", n)}
		}
		if err != nil {
			return [32]byte{}, fmt.Errorf("stream %d %s: read at %d: %w", h.Index, d, v.off, err)
		}
	}
	return v.sum(), nil
}

// ExpectEOF reads from r and fails unless the next thing is EOF.
func ExpectEOF(r io.Reader, h Header, d Dir, at uint64) error {
	var b [1]byte
	for {
		k, err := r.Read(b[:])
		if k > 0 {
			return &DataError{Index: h.Index, Dir: d, Offset: at, Reason: "data past the announced size"}
		}
		if err == io.EOF {
			return nil
		}
		if err != nil {
			return fmt.Errorf("stream %d %s: waiting for EOF: %w", h.Index, d, err)
		}
	}
}

// send writes n bytes of direction d to w in chunks of varied size and
// returns their SHA-256.
func send(w io.Writer, h Header, d Dir, n uint64) ([32]byte, error) {
	g, sum := NewGen(h.Seed, h.Index, d), sha256.New()
	buf := make([]byte, 64<<10)
	chunk := uint64(1 + h.Index%7*9000)
	for n > 0 {
		k := min(n, chunk)
		g.Fill(buf[:k])
		sum.Write(buf[:k])
		if _, err := w.Write(buf[:k]); err != nil {
			return [32]byte{}, fmt.Errorf("stream %d %s: write: %w", h.Index, d, err)
		}
		n -= k
		chunk = min(chunk*2+1, uint64(len(buf)))
	}
	var s [32]byte
	sum.Sum(s[:0])
	return s, nil
}

type closeWriter interface{ CloseWrite() error }

// bound makes ctx's end interrupt c's blocked reads and writes.
func bound(ctx context.Context, c net.Conn) (stop func() bool) {
	return context.AfterFunc(ctx, func() { c.SetDeadline(time.Unix(1, 0)) })
}

// Run is the client side: it sends h and h.Up bytes, half-closes, and
// receives h.Down bytes. It returns once those arrived, with the stream
// still open: call ExpectEOF (the server closes when released), then
// Close. c must have CloseWrite (TCP, vsdpnet, sdp connections do).
func Run(ctx context.Context, c net.Conn, h Header) (Report, error) {
	if err := h.check(); err != nil {
		return Report{}, err
	}
	cw, ok := c.(closeWriter)
	if !ok {
		return Report{}, fmt.Errorf("streamcheck: %T has no CloseWrite", c)
	}
	defer bound(ctx, c)()
	r := Report{Header: h, Local: c.LocalAddr().String(), Remote: c.RemoteAddr().String()}
	var wg sync.WaitGroup
	var werr error
	wg.Go(func() {
		hb := h.Marshal()
		if _, werr = c.Write(hb[:]); werr != nil {
			return
		}
		if r.UpSum, werr = send(c, h, Up, h.Up); werr != nil {
			return
		}
		werr = cw.CloseWrite()
	})
	var rerr error
	r.DownSum, rerr = receive(c, h, Down, h.Down)
	if rerr != nil {
		c.SetDeadline(time.Unix(1, 0)) // unblock the writer
	}
	wg.Wait()
	if err := errors.Join(rerr, werr); err != nil {
		return Report{}, err
	}
	return r, nil
}

// Serve is the server side: it reads a header, has accept check it (nil:
// any valid header), receives and checks Up bytes and the EOF after them
// while sending Down bytes. It returns once both are done, with the stream
// open; the caller closes it when it wants the client to see EOF.
func Serve(ctx context.Context, c net.Conn, accept func(Header) error) (Report, error) {
	defer bound(ctx, c)()
	var hb [HeaderSize]byte
	if _, err := io.ReadFull(c, hb[:]); err != nil {
		return Report{}, fmt.Errorf("streamcheck: reading the header: %w", err)
	}
	h, err := ParseHeader(hb[:])
	if err != nil {
		return Report{}, err
	}
	if accept != nil {
		if err := accept(h); err != nil {
			return Report{}, err
		}
	}
	r := Report{Header: h, Local: c.LocalAddr().String(), Remote: c.RemoteAddr().String()}
	var wg sync.WaitGroup
	var werr error
	wg.Go(func() { r.DownSum, werr = send(c, h, Down, h.Down) })
	var rerr error
	if r.UpSum, rerr = receive(c, h, Up, h.Up); rerr == nil {
		rerr = ExpectEOF(c, h, Up, h.Up)
	}
	if rerr != nil {
		c.SetDeadline(time.Unix(1, 0))
	}
	wg.Wait()
	if err := errors.Join(rerr, werr); err != nil {
		return Report{}, err
	}
	return r, nil
}
