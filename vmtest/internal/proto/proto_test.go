package proto

import (
	"bufio"
	"bytes"
	"errors"
	"io"
	"strings"
	"testing"
	"time"
)

func frameBytes(t testing.TB, f Frame) []byte {
	t.Helper()
	b, err := AppendFrame(nil, f)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func TestFrameRoundTrip(t *testing.T) {
	for _, f := range []Frame{
		{Type: TypeHello, Payload: []byte(`{"version":1}`)},
		{Type: TypeExec, ID: 0xdeadbeef, Payload: bytes.Repeat([]byte("x"), 70000)},
		{Type: TypeCancel, ID: 7},
		{Type: TypeReply, ID: 1, Payload: []byte("{}")},
	} {
		var buf bytes.Buffer
		if err := WriteFrame(&buf, f); err != nil {
			t.Fatal(err)
		}
		if buf.Len() != HeaderSize+len(f.Payload) {
			t.Errorf("%v: encoded %d bytes", f.Type, buf.Len())
		}
		got, err := ReadFrame(&buf)
		if err != nil {
			t.Fatal(err)
		}
		if got.Type != f.Type || got.ID != f.ID || !bytes.Equal(got.Payload, f.Payload) {
			t.Errorf("round trip of %v/%d changed it", f.Type, f.ID)
		}
	}
}

func TestAppendFrameRejects(t *testing.T) {
	for _, f := range []Frame{
		{Type: 0},
		{Type: typeEnd},
		{Type: TypeExec, Payload: make([]byte, MaxPayload+1)},
	} {
		if _, err := AppendFrame(nil, f); !errors.Is(err, ErrFrame) {
			t.Errorf("%v with %d bytes: err %v, want ErrFrame", f.Type, len(f.Payload), err)
		}
	}
}

func TestReadFrameRejects(t *testing.T) {
	good := frameBytes(t, Frame{Type: TypeExec, ID: 1, Payload: []byte("abc")})
	mod := func(f func(b []byte) []byte) []byte { return f(append([]byte(nil), good...)) }
	tests := []struct {
		name string
		in   []byte
		want error
	}{
		{"bad magic", mod(func(b []byte) []byte { b[0] = 'X'; return b }), ErrFrame},
		{"type zero", mod(func(b []byte) []byte { b[4] = 0; return b }), ErrFrame},
		{"type unknown", mod(func(b []byte) []byte { b[4] = 200; return b }), ErrFrame},
		{"reserved", mod(func(b []byte) []byte { b[6] = 1; return b }), ErrFrame},
		{"too long", mod(func(b []byte) []byte { b[12] = 0xff; return b }), ErrFrame},
		{"short header", good[:10], io.ErrUnexpectedEOF},
		{"short payload", good[:HeaderSize+1], io.ErrUnexpectedEOF},
		{"empty", nil, io.EOF},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if _, err := ReadFrame(bytes.NewReader(tt.in)); !errors.Is(err, tt.want) {
				t.Errorf("err %v, want %v", err, tt.want)
			}
		})
	}
}

func TestReadFrameSync(t *testing.T) {
	hello := frameBytes(t, Frame{Type: TypeHello, Payload: []byte("h")})
	reply := frameBytes(t, Frame{Type: TypeReply, ID: 9, Payload: []byte("r")})
	// Noise, a false magic with a bad header right before a real frame, a
	// half magic, then two frames.
	in := append([]byte("garbage VS VSD VSDA\xff\x00"), hello...)
	in = append(append(in, "VSD"...), reply...)
	br := bufio.NewReader(bytes.NewReader(in))
	for _, want := range []Type{TypeHello, TypeReply} {
		f, err := ReadFrameSync(br, 1<<10)
		if err != nil {
			t.Fatal(err)
		}
		if f.Type != want {
			t.Errorf("got %v, want %v", f.Type, want)
		}
	}
	if _, err := ReadFrameSync(br, 1<<10); err != io.EOF {
		t.Errorf("at end: err %v, want EOF", err)
	}
	// Noise beyond the bound.
	br = bufio.NewReader(strings.NewReader(strings.Repeat("x", 5000) + string(hello)))
	if _, err := ReadFrameSync(br, 100); !errors.Is(err, ErrFrame) {
		t.Errorf("long noise: err %v, want ErrFrame", err)
	}
}

func TestExecValidate(t *testing.T) {
	ok := Exec{Argv: []string{"true"}, TimeoutMS: 1000, MaxOutput: 10}
	tests := []struct {
		name string
		mod  func(e *Exec)
		bad  bool
	}{
		{"ok", func(e *Exec) {}, false},
		{"no argv", func(e *Exec) { e.Argv = nil }, true},
		{"empty program", func(e *Exec) { e.Argv = []string{""} }, true},
		{"too many args", func(e *Exec) { e.Argv = make([]string, MaxArgs+1); e.Argv[0] = "x" }, true},
		{"zero timeout", func(e *Exec) { e.TimeoutMS = 0 }, true},
		{"huge timeout", func(e *Exec) { e.TimeoutMS = int64(2 * MaxTimeout / time.Millisecond) }, true},
		{"negative output", func(e *Exec) { e.MaxOutput = -1 }, true},
		{"huge output", func(e *Exec) { e.MaxOutput = MaxOutputCap + 1 }, true},
		{"NUL arg", func(e *Exec) { e.Argv = []string{"a", "b\x00"} }, true},
		{"NUL env", func(e *Exec) { e.Env = []string{"A=\x00"} }, true},
		{"env no =", func(e *Exec) { e.Env = []string{"A"} }, true},
		{"env empty key", func(e *Exec) { e.Env = []string{"=x"} }, true},
	}
	for _, tt := range tests {
		e := ok
		tt.mod(&e)
		if err := e.Validate(); (err != nil) != tt.bad {
			t.Errorf("%s: Validate() = %v", tt.name, err)
		}
	}
}

func TestFileValidate(t *testing.T) {
	for _, tt := range []struct {
		name string
		err  error
		bad  bool
	}{
		{"write ok", (&WriteFile{Path: "/a", Mode: 0o755}).Validate(), false},
		{"write relative", (&WriteFile{Path: "a"}).Validate(), true},
		{"write empty", (&WriteFile{}).Validate(), true},
		{"write NUL", (&WriteFile{Path: "/a\x00"}).Validate(), true},
		{"write mode", (&WriteFile{Path: "/a", Mode: 0o170000}).Validate(), true},
		{"write big", (&WriteFile{Path: "/a", Data: make([]byte, MaxFile+1)}).Validate(), true},
		{"read ok", (&ReadFile{Path: "/a", Max: 10}).Validate(), false},
		{"read zero max", (&ReadFile{Path: "/a"}).Validate(), true},
		{"read huge max", (&ReadFile{Path: "/a", Max: MaxFile + 1}).Validate(), true},
		{"read relative", (&ReadFile{Path: "a", Max: 1}).Validate(), true},
	} {
		if (tt.err != nil) != tt.bad {
			t.Errorf("%s: %v", tt.name, tt.err)
		}
	}
}

func TestTypeString(t *testing.T) {
	if TypeExec.String() != "exec" || Type(99).String() != "type(99)" {
		t.Errorf("String: %q %q", TypeExec, Type(99))
	}
}

// FuzzReadFrame: no input makes the decoders panic, allocate beyond the
// bound, or return a frame that does not re-encode to the bytes it came
// from.
func FuzzReadFrame(f *testing.F) {
	f.Add(frameBytes(f, Frame{Type: TypeHello, Payload: []byte(`{"version":1}`)}))
	f.Add(frameBytes(f, Frame{Type: TypeCancel, ID: 3}))
	f.Add([]byte("noise VSDA\x07\x00\x00\x00\x00\x00\x00\x01\x00\x00\x00\x02{}"))
	f.Add([]byte("VSDA\x02\x00\x00\x00\x00\x00\x00\x01\xff\xff\xff\xff"))
	f.Fuzz(func(t *testing.T, in []byte) {
		if fr, err := ReadFrame(bytes.NewReader(in)); err == nil {
			b, err := AppendFrame(nil, fr)
			if err != nil {
				t.Fatalf("decoded frame does not encode: %v", err)
			}
			if !bytes.Equal(b, in[:len(b)]) {
				t.Fatalf("re-encoding differs")
			}
		}
		br := bufio.NewReader(bytes.NewReader(in))
		for range 64 {
			fr, err := ReadFrameSync(br, len(in))
			if err != nil {
				break
			}
			if len(fr.Payload) > MaxPayload || fr.Type == 0 || fr.Type >= typeEnd {
				t.Fatalf("bad frame accepted: %v, %d bytes", fr.Type, len(fr.Payload))
			}
		}
	})
}
