//go:build linux && cgo

package ibv

import (
	"errors"
	"fmt"
	"syscall"
	"testing"
	"time"

	"github.com/vsdp/vsdp/verbs"
)

// TestCastMatchesC proves that the verbs constants converted by cast equal
// the libibverbs enumerators (the C side is collected in consts.go).
func TestCastMatchesC(t *testing.T) {
	pairs := castPairs()
	if len(pairs) < 40 {
		t.Fatalf("only %d pairs", len(pairs))
	}
	for _, p := range pairs {
		if p.goV != p.cV {
			t.Errorf("%s: verbs value %#x, C value %#x", p.name, p.goV, p.cV)
		}
	}
	for name, size := range cSizes() {
		if name == "verbs.SGE" {
			continue
		}
		want := map[string]uintptr{"struct ibv_sge": 16, "struct vsdp_wc": 40}[name]
		if size != want {
			t.Errorf("sizeof %s = %d, want %d", name, size, want)
		}
	}
}

func TestWROpcode(t *testing.T) {
	seen := map[uint32]verbs.Opcode{}
	for op := verbs.Opcode(0); op < 20; op++ {
		c, ok := wrOpcode(op)
		if ok != op.Valid() {
			t.Errorf("wrOpcode(%v) ok = %v, want %v", op, ok, op.Valid())
		}
		if !ok {
			continue
		}
		if prev, dup := seen[c]; dup {
			t.Errorf("%v and %v both map to %d", prev, op, c)
		}
		seen[c] = op
	}
	// The libibverbs values (enum ibv_wr_opcode), independently of cgo.
	want := map[verbs.Opcode]uint32{
		verbs.OpWrite: 0, verbs.OpWriteImm: 1, verbs.OpSend: 2, verbs.OpSendImm: 3,
		verbs.OpRead: 4, verbs.OpLocalInv: 7, verbs.OpBindMW: 8, verbs.OpSendInv: 9,
	}
	for op, v := range want {
		if c, _ := wrOpcode(op); c != v {
			t.Errorf("wrOpcode(%v) = %d, want %d", op, c, v)
		}
	}
}

func TestCompletionOp(t *testing.T) {
	vals := wcOpcodeValues()
	if len(vals) != 7 {
		t.Fatalf("%d completion opcodes", len(vals))
	}
	for op, c := range vals {
		if got := compOp(c); got != op {
			t.Errorf("compOp(%d) = %v, want %v", c, got, op)
		}
	}
	for _, c := range []uint32{3 /* COMP_SWAP */, 4 /* FETCH_ADD */, 7 /* TSO */, 9 /* ATOMIC_WRITE */, 130 /* TM_ADD */, 0xffff} {
		if got := compOp(c); got != 0 {
			t.Errorf("compOp(%d) = %v, want 0", c, got)
		}
	}
}

func TestCompletion(t *testing.T) {
	imm, inv := wcFlagValues()
	vals := wcOpcodeValues()
	tests := []struct {
		name                        string
		status, opcode, flags, data uint32
		want                        verbs.Completion
	}{
		{"send", 0, vals[verbs.CompSend], 0, 0,
			verbs.Completion{ID: 7, Op: verbs.CompSend, ByteLen: 100, QPN: 9}},
		{"recv with imm", 0, vals[verbs.CompRecv], imm, 0xdeadbeef,
			verbs.Completion{ID: 7, Op: verbs.CompRecv, Flags: verbs.WithImm, ByteLen: 100, Imm: 0xdeadbeef, QPN: 9}},
		{"write imm", 0, vals[verbs.CompRecvWriteImm], imm, 5,
			verbs.Completion{ID: 7, Op: verbs.CompRecvWriteImm, Flags: verbs.WithImm, ByteLen: 100, Imm: 5, QPN: 9}},
		{"recv with inv", 0, vals[verbs.CompRecv], inv, 0x1234,
			verbs.Completion{ID: 7, Op: verbs.CompRecv, Flags: verbs.WithInv, ByteLen: 100, InvalidatedRKey: 0x1234, QPN: 9}},
		{"grh flag ignored", 0, vals[verbs.CompRecv], 1, 0,
			verbs.Completion{ID: 7, Op: verbs.CompRecv, ByteLen: 100, QPN: 9}},
		{"flushed: only identity", uint32(verbs.StatusFlushed), vals[verbs.CompRecv], imm, 5,
			verbs.Completion{ID: 7, Status: verbs.StatusFlushed, QPN: 9}},
		{"remote access", uint32(verbs.StatusRemoteAccess), 0xff, 0, 0,
			verbs.Completion{ID: 7, Status: verbs.StatusRemoteAccess, QPN: 9}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			w := newWC(7, tt.status, tt.opcode, tt.flags, tt.data, 100, 9)
			if got := completion(&w, false); got != tt.want {
				t.Errorf("completion = %+v, want %+v", got, tt.want)
			}
		})
	}
}

// TestCompletionRXEFlags: soft-RoCE's WITH_INV arrives in the bit libibverbs
// names IP_CSUM_OK; only for rxe, and only on receives, is it read as
// WITH_INV.
func TestCompletionRXEFlags(t *testing.T) {
	csum := csumFlag()
	vals := wcOpcodeValues()
	w := newWC(1, 0, vals[verbs.CompRecv], csum, 0x8000158, 4, 3)
	if c := completion(&w, true); c.Flags != verbs.WithInv || c.InvalidatedRKey != 0x8000158 {
		t.Errorf("rxe receive with the csum bit: %+v, want WithInv 0x8000158", c)
	}
	if c := completion(&w, false); c.Flags != 0 || c.InvalidatedRKey != 0 {
		t.Errorf("non-rxe receive with the csum bit: %+v, want no flags", c)
	}
	w = newWC(1, 0, vals[verbs.CompSend], csum, 0x8000158, 4, 3)
	if c := completion(&w, true); c.Flags != 0 {
		t.Errorf("rxe send with the csum bit: %+v, want no flags", c)
	}
}

func TestAsyncEvent(t *testing.T) {
	for typ, c := range asyncEventValues() {
		got, ok := asyncEvent(c)
		if !ok || got != typ {
			t.Errorf("asyncEvent(%d) = %v, %v; want %v", c, got, ok, typ)
		}
	}
	for _, c := range []int32{4 /* COMM_EST */, 9 /* PORT_ACTIVE */, 8 /* DEVICE_FATAL */, -1, 1000} {
		if got, ok := asyncEvent(c); ok {
			t.Errorf("asyncEvent(%d) = %v, want none", c, got)
		}
	}
}

func TestRNRTimerCode(t *testing.T) {
	tests := []struct {
		d    time.Duration
		code uint8
		ok   bool
	}{
		{0, 0, false},
		{-time.Millisecond, 0, false},
		{time.Nanosecond, 1, true}, // 0.01 ms is the shortest
		{10 * time.Microsecond, 1, true},
		{11 * time.Microsecond, 2, true},
		{time.Millisecond, 14, true}, // 1.28 ms
		{1280 * time.Microsecond, 14, true},
		{1281 * time.Microsecond, 15, true},
		{491520 * time.Microsecond, 31, true},
		{500 * time.Millisecond, 0, true}, // only 655.36 ms is longer
		{655360 * time.Microsecond, 0, true},
		{time.Hour, 0, true}, // nothing is longer: the longest
	}
	for _, tt := range tests {
		code, ok := rnrTimerCode(tt.d)
		if code != tt.code || ok != tt.ok {
			t.Errorf("rnrTimerCode(%v) = %d, %v; want %d, %v", tt.d, code, ok, tt.code, tt.ok)
		}
	}
	// Codes 1..31 ascend, and each duration maps back to its own code.
	for c := uint8(1); c < 32; c++ {
		if c > 1 && rnrTimerDuration(c) <= rnrTimerDuration(c-1) {
			t.Errorf("code %d (%v) not above code %d", c, rnrTimerDuration(c), c-1)
		}
		if got, _ := rnrTimerCode(rnrTimerDuration(c)); got != c {
			t.Errorf("rnrTimerCode(%v) = %d, want %d", rnrTimerDuration(c), got, c)
		}
	}
	if rnrTimerDuration(0) != 655360*time.Microsecond {
		t.Errorf("code 0 = %v", rnrTimerDuration(0))
	}
}

func TestAckTimeoutDuration(t *testing.T) {
	for _, tt := range []struct {
		code int
		want time.Duration
	}{
		{0, 0}, // no timeout
		{-1, 0},
		{32, 0},
		{1, 8192 * time.Nanosecond},
		{14, 67108864 * time.Nanosecond}, // perftest's default: 67 ms
		{17, 536870912 * time.Nanosecond},
		{31, 4096 << 31 * time.Nanosecond},
	} {
		if got := ackTimeoutDuration(tt.code); got != tt.want {
			t.Errorf("ackTimeoutDuration(%d) = %v, want %v", tt.code, got, tt.want)
		}
	}
}

func TestErrnoSentinel(t *testing.T) {
	tests := []struct {
		errno syscall.Errno
		want  error
	}{
		{syscall.EINVAL, verbs.ErrInvalid},
		{syscall.ENOMEM, verbs.ErrQueueFull},
		{syscall.EBUSY, verbs.ErrBusy},
		{syscall.EADDRINUSE, verbs.ErrBusy},
		{syscall.ENOSYS, verbs.ErrNotSupported},
		{syscall.EOPNOTSUPP, verbs.ErrNotSupported},
		{syscall.EPROTONOSUPPORT, verbs.ErrNotSupported},
		{syscall.ENODEV, verbs.ErrNotSupported},
		{syscall.ENETUNREACH, verbs.ErrUnreachable},
		{syscall.EHOSTUNREACH, verbs.ErrUnreachable},
		{syscall.EADDRNOTAVAIL, verbs.ErrUnreachable},
		{syscall.ETIMEDOUT, verbs.ErrTimeout},
		{syscall.ECONNREFUSED, verbs.ErrRefused},
		{syscall.ECONNRESET, verbs.ErrDisconnected},
		{syscall.EPROTO, verbs.ErrProtocol},
		{syscall.EIO, verbs.ErrNotSupported},
	}
	for _, tt := range tests {
		err := callErr("op", tt.errno)
		if !errors.Is(err, tt.want) || !errors.Is(err, tt.errno) {
			t.Errorf("callErr(%v) = %v: not %v and the errno", tt.errno, err, tt.want)
		}
		if err2 := rcErr("op", -int(tt.errno)); !errors.Is(err2, tt.want) {
			t.Errorf("rcErr(-%d) = %v, want %v", tt.errno, err2, tt.want)
		}
	}
	if err := callErr("op", nil); !errors.Is(err, syscall.EIO) {
		t.Errorf("callErr(nil) = %v, want EIO", err)
	}
	if err := statusErr("op", 0); !errors.Is(err, syscall.EIO) {
		t.Errorf("statusErr(0) = %v, want EIO", err)
	}
	var e *Error
	if err := fmt.Errorf("wrapped: %w", callErr("ibv_reg_mr", syscall.EFAULT)); !errors.As(err, &e) || e.Op != "ibv_reg_mr" {
		t.Errorf("errors.As(*Error) failed on %v", err)
	}
}

// FuzzCompletion feeds arbitrary completion records (as a device could
// produce them) through the conversion and checks its invariants.
func FuzzCompletion(f *testing.F) {
	imm, inv := wcFlagValues()
	f.Add(uint64(1), uint32(0), uint32(128), imm, uint32(5), uint32(64), uint32(17))
	f.Add(uint64(2), uint32(5), uint32(0), uint32(0), uint32(0), uint32(0), uint32(17))
	f.Add(uint64(3), uint32(0), uint32(128), inv, uint32(0x100), uint32(0), uint32(1))
	f.Add(^uint64(0), ^uint32(0), ^uint32(0), ^uint32(0), ^uint32(0), ^uint32(0), ^uint32(0))
	f.Fuzz(func(t *testing.T, id uint64, status, opcode, flags, data, byteLen, qpn uint32) {
		w := newWC(id, status, opcode, flags, data, byteLen, qpn)
		c := completion(&w, flags&1 != 0)
		if c.ID != id || c.QPN != qpn || (c.Status == verbs.StatusSuccess) != (status == 0) {
			t.Fatalf("identity fields changed: %+v from status %d", c, status)
		}
		if c.Status != verbs.StatusSuccess {
			if c.Op != 0 || c.Flags != 0 || c.ByteLen != 0 || c.Imm != 0 || c.InvalidatedRKey != 0 {
				t.Fatalf("error completion carries data: %+v", c)
			}
			return
		}
		if c.Flags&^(verbs.WithImm|verbs.WithInv) != 0 {
			t.Fatalf("unknown flags %v", c.Flags)
		}
		if c.Imm != 0 && c.Flags&verbs.WithImm == 0 {
			t.Fatalf("Imm without WithImm: %+v", c)
		}
		if c.InvalidatedRKey != 0 && (c.Flags&verbs.WithInv == 0 || c.Flags&verbs.WithImm != 0) {
			t.Fatalf("InvalidatedRKey without WithInv alone: %+v", c)
		}
	})
}
