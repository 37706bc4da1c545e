package proto

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"time"
)

// Magic starts every frame.
const Magic = "VSDA"

// HeaderSize is the size of a frame header.
const HeaderSize = 16

// MaxPayload bounds a frame's payload (file contents travel in frames).
const MaxPayload = 32 << 20

// Version is the protocol version the agent reports in Hello.
const Version = 1

// Type is a frame type.
type Type uint8

// Frame types.
const (
	TypeHello     Type = 1 // agent → host, Hello
	TypeExec      Type = 2 // host → agent, Exec; reply carries ExecResult
	TypeCancel    Type = 3 // host → agent, no payload: kill the Exec with this id
	TypeWriteFile Type = 4 // host → agent, WriteFile
	TypeReadFile  Type = 5 // host → agent, ReadFile; reply carries Data
	TypePoweroff  Type = 6 // host → agent, no payload; replied to before the power-off
	TypeReply     Type = 7 // agent → host, Reply
	typeEnd       Type = 8
)

var typeNames = [...]string{"invalid", "hello", "exec", "cancel", "write-file", "read-file", "poweroff", "reply"}

func (t Type) String() string {
	if t < typeEnd {
		return typeNames[t]
	}
	return fmt.Sprintf("type(%d)", uint8(t))
}

// ErrFrame reports a malformed frame header.
var ErrFrame = errors.New("proto: malformed frame")

// Frame is one decoded frame.
type Frame struct {
	Type    Type
	ID      uint32
	Payload []byte
}

// AppendFrame appends the encoding of f to b.
func AppendFrame(b []byte, f Frame) ([]byte, error) {
	if len(f.Payload) > MaxPayload {
		return b, fmt.Errorf("%w: payload of %d bytes exceeds %d", ErrFrame, len(f.Payload), MaxPayload)
	}
	if f.Type == 0 || f.Type >= typeEnd {
		return b, fmt.Errorf("%w: %v", ErrFrame, f.Type)
	}
	b = append(b, Magic...)
	b = append(b, byte(f.Type), 0, 0, 0)
	b = binary.BigEndian.AppendUint32(b, f.ID)
	b = binary.BigEndian.AppendUint32(b, uint32(len(f.Payload)))
	return append(b, f.Payload...), nil
}

// WriteFrame writes f with one Write call, so writers sharing w under a lock
// never interleave.
func WriteFrame(w io.Writer, f Frame) error {
	b, err := AppendFrame(make([]byte, 0, HeaderSize+len(f.Payload)), f)
	if err != nil {
		return err
	}
	_, err = w.Write(b)
	return err
}

// header is a decoded frame header.
type header struct {
	t  Type
	id uint32
	n  uint32
}

// parseHeader checks and decodes a frame header.
func parseHeader(h []byte) (header, error) {
	if string(h[:4]) != Magic {
		return header{}, fmt.Errorf("%w: bad magic %q", ErrFrame, h[:4])
	}
	t := Type(h[4])
	if t == 0 || t >= typeEnd {
		return header{}, fmt.Errorf("%w: unknown type %d", ErrFrame, h[4])
	}
	if h[5]|h[6]|h[7] != 0 {
		return header{}, fmt.Errorf("%w: reserved bytes set", ErrFrame)
	}
	n := binary.BigEndian.Uint32(h[12:16])
	if n > MaxPayload {
		return header{}, fmt.Errorf("%w: payload of %d bytes exceeds %d", ErrFrame, n, MaxPayload)
	}
	return header{t: t, id: binary.BigEndian.Uint32(h[8:12]), n: n}, nil
}

// ReadFrame reads one frame. A bad header is an error wrapping ErrFrame;
// nothing is allocated for the payload before the header is checked.
func ReadFrame(r io.Reader) (Frame, error) {
	var h [HeaderSize]byte
	if _, err := io.ReadFull(r, h[:]); err != nil {
		return Frame{}, err
	}
	hd, err := parseHeader(h[:])
	if err != nil {
		return Frame{}, err
	}
	return readPayload(r, hd)
}

func readPayload(r io.Reader, hd header) (Frame, error) {
	f := Frame{Type: hd.t, ID: hd.id}
	if hd.n > 0 {
		f.Payload = make([]byte, hd.n)
		if _, err := io.ReadFull(r, f.Payload); err != nil {
			if err == io.EOF {
				err = io.ErrUnexpectedEOF
			}
			return Frame{}, err
		}
	}
	return f, nil
}

// ReadFrameSync reads the next well-formed frame, skipping noise: bytes
// before a magic, and a magic whose header is malformed (only its first
// byte is dropped, so a real frame right behind noise is still found). It
// gives up with ErrFrame after skipping max bytes.
func ReadFrameSync(r *bufio.Reader, max int) (Frame, error) {
	for skipped := 0; ; {
		if err := Sync(r, max-skipped); err != nil {
			return Frame{}, err
		}
		h, err := r.Peek(HeaderSize)
		if err != nil {
			return Frame{}, err
		}
		hd, err := parseHeader(h)
		if err != nil {
			if skipped++; skipped > max {
				return Frame{}, fmt.Errorf("%w: no frame in %d bytes", ErrFrame, max)
			}
			r.Discard(1)
			continue
		}
		r.Discard(HeaderSize)
		return readPayload(r, hd)
	}
}

// Sync discards bytes from r up to the next Magic, leaving the magic
// unread. It gives up after max bytes (ErrFrame).
func Sync(r *bufio.Reader, max int) error {
	for skipped := 0; ; {
		b, err := r.Peek(len(Magic))
		if bytes.Equal(b, []byte(Magic)) {
			return nil
		}
		if err != nil {
			return err
		}
		if skipped >= max {
			return fmt.Errorf("%w: no magic in %d bytes", ErrFrame, skipped)
		}
		// Skip to the next byte that could start the magic.
		i := bytes.IndexByte(b[1:], Magic[0])
		if i < 0 {
			i = len(b) - 1
		}
		r.Discard(i + 1)
		skipped += i + 1
	}
}

// Hello is the agent's greeting.
type Hello struct {
	Version int    `json:"version"`
	Kernel  string `json:"kernel"` // uname -r
	PID     int    `json:"pid"`
	Start   int64  `json:"start"` // agent start, Unix nanoseconds (tells restarts apart)
}

// Exec asks the agent to run a program.
type Exec struct {
	Argv      []string `json:"argv"`
	Env       []string `json:"env,omitempty"` // added to the agent's environment
	Dir       string   `json:"dir,omitempty"`
	Stdin     []byte   `json:"stdin,omitempty"`
	TimeoutMS int64    `json:"timeout_ms"` // the process group is killed after this
	MaxOutput int      `json:"max_output"` // bytes kept of stdout and of stderr each
}

// Limits on requests, checked by Validate.
const (
	MaxArgs      = 4096
	MaxTimeout   = time.Hour
	MaxOutputCap = 16 << 20
	MaxFile      = 16 << 20 // bytes of a ReadFile or WriteFile (base64 in JSON fits MaxPayload)
)

// Validate checks an Exec request.
func (e *Exec) Validate() error {
	switch {
	case len(e.Argv) == 0 || e.Argv[0] == "":
		return errors.New("empty argv")
	case len(e.Argv)+len(e.Env) > MaxArgs:
		return fmt.Errorf("more than %d arguments and environment entries", MaxArgs)
	case e.TimeoutMS <= 0 || time.Duration(e.TimeoutMS)*time.Millisecond > MaxTimeout:
		return fmt.Errorf("timeout %d ms outside (0, %v]", e.TimeoutMS, MaxTimeout)
	case e.MaxOutput < 0 || e.MaxOutput > MaxOutputCap:
		return fmt.Errorf("max output %d outside [0, %d]", e.MaxOutput, MaxOutputCap)
	}
	for _, s := range append(append([]string(nil), e.Argv...), e.Env...) {
		if bytes.IndexByte([]byte(s), 0) >= 0 {
			return errors.New("NUL in argument or environment")
		}
	}
	for _, kv := range e.Env {
		if i := bytes.IndexByte([]byte(kv), '='); i <= 0 {
			return fmt.Errorf("environment entry %q is not KEY=VALUE", kv)
		}
	}
	return nil
}

// ExecResult is how a program ended.
type ExecResult struct {
	Stdout     []byte `json:"stdout,omitempty"`
	Stderr     []byte `json:"stderr,omitempty"`
	Exit       int    `json:"exit"`             // exit status; -1 when killed by a signal
	Signal     string `json:"signal,omitempty"` // the signal that killed it
	TimedOut   bool   `json:"timed_out,omitempty"`
	Canceled   bool   `json:"canceled,omitempty"`
	Truncated  bool   `json:"truncated,omitempty"` // output beyond MaxOutput was dropped
	DurationNS int64  `json:"duration_ns"`
}

// WriteFile asks the agent to write a file (parents created).
type WriteFile struct {
	Path   string `json:"path"`
	Data   []byte `json:"data"`
	Mode   uint32 `json:"mode"` // permission bits; 0 means 0644
	Append bool   `json:"append,omitempty"`
}

// ReadFile asks the agent for a file's content, at most Max bytes.
type ReadFile struct {
	Path string `json:"path"`
	Max  int64  `json:"max"`
}

// checkPath accepts an absolute path without NUL.
func checkPath(p string) error {
	if len(p) == 0 || p[0] != '/' || bytes.IndexByte([]byte(p), 0) >= 0 {
		return fmt.Errorf("path %q is not absolute", p)
	}
	return nil
}

// Validate checks a WriteFile request.
func (w *WriteFile) Validate() error {
	if err := checkPath(w.Path); err != nil {
		return err
	}
	if len(w.Data) > MaxFile {
		return fmt.Errorf("%d bytes exceed %d", len(w.Data), MaxFile)
	}
	if w.Mode&^0o7777 != 0 {
		return fmt.Errorf("mode %o is not permission bits", w.Mode)
	}
	return nil
}

// Validate checks a ReadFile request.
func (r *ReadFile) Validate() error {
	if err := checkPath(r.Path); err != nil {
		return err
	}
	if r.Max <= 0 || r.Max > MaxFile {
		return fmt.Errorf("max %d outside (0, %d]", r.Max, MaxFile)
	}
	return nil
}

// Reply answers a request. Error is set when the request failed (bad
// request, program not found, file error); Exec holds an Exec's result
// (which may be a non-zero exit); Data holds a ReadFile's content.
type Reply struct {
	Error string      `json:"error,omitempty"`
	Exec  *ExecResult `json:"exec,omitempty"`
	Data  []byte      `json:"data,omitempty"`
}
