package verbs

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

func TestStrings(t *testing.T) {
	for _, r := range []struct {
		got, want string
	}{
		{Access(0).String(), "0"},
		{(AccessLocalWrite | AccessRemoteRead).String(), "LOCAL_WRITE|REMOTE_READ"},
		{(AccessMWBind | 1<<7).String(), "MW_BIND|0x80"},
		{OpSendImm.String(), "SEND_WITH_IMM"},
		{OpLocalInv.String(), "LOCAL_INV"},
		{Opcode(0).String(), "Opcode(0)"},
		{Opcode(99).String(), "Opcode(99)"},
		{(SendSignaled | SendInline).String(), "SIGNALED|INLINE"},
		{SendFlags(0).String(), "0"},
		{StatusSuccess.String(), "SUCCESS"},
		{StatusFlushed.String(), "WR_FLUSH_ERR"},
		{StatusRNRRetryExceeded.String(), "RNR_RETRY_EXC_ERR"},
		{StatusGeneral.String(), "GENERAL_ERR"},
		{Status(22).String(), "Status(22)"},
		{QPRTS.String(), "RTS"},
		{QPError.String(), "ERR"},
		{QPState(7).String(), "QPState(7)"},
		{CompRecvWriteImm.String(), "RECV_RDMA_WITH_IMM"},
		{CompletionOp(0).String(), "CompletionOp(0)"},
		{(WithImm | WithInv).String(), "WITH_IMM|WITH_INV"},
		{CompletionFlags(4).String(), "CompletionFlags(0x4)"},
		{EventQPAccessError.String(), "QP_ACCESS_ERR"},
		{EventType(0).String(), "EventType(0)"},
		{RejectConsumer.String(), "CONSUMER_DEFINED"},
		{RejectReason(2).String(), "RejectReason(2)"},
		{SDPServiceID(5000).String(), "sdp:5000"},
		{TCPServiceID(80).String(), "rdma-tcp:80"},
		{ServiceID(0x1234_0000_0000).String(), "0x123400000000"},
		{Event{Type: EventDisconnected, QPN: 3}.String(), "DISCONNECTED qp 3"},
	} {
		if r.got != r.want {
			t.Errorf("got %q, want %q", r.got, r.want)
		}
	}
	// Every defined value has a name of its own.
	for s := StatusSuccess; s <= StatusGeneral; s++ {
		if strings.HasPrefix(s.String(), "Status(") {
			t.Errorf("status %d has no name", s)
		}
	}
	for o := OpSend; o <= OpLocalInv; o++ {
		if !o.Valid() || strings.HasPrefix(o.String(), "Opcode(") {
			t.Errorf("opcode %d", o)
		}
	}
	for e := EventEstablished; e < eventTypeCount; e++ {
		if strings.HasPrefix(e.String(), "EventType(") {
			t.Errorf("event %d has no name", e)
		}
	}
}

func TestAccessValidate(t *testing.T) {
	for _, r := range []struct {
		a    Access
		okMR bool
	}{
		{0, true},
		{AccessLocalWrite, true},
		{AccessRemoteRead, true},
		{AccessLocalWrite | AccessRemoteWrite, true},
		{AccessRemoteWrite, false},
		{AccessRemoteAtomic, false},
		{AccessLocalWrite | AccessRemoteAtomic, true},
		{AccessMWBind, true},
		{1 << 9, false},
	} {
		if err := r.a.ValidateMR(); (err == nil) != r.okMR || (err != nil && !errors.Is(err, ErrInvalid)) {
			t.Errorf("ValidateMR(%v) = %v", r.a, err)
		}
	}
	for _, r := range []struct {
		w, mr Access
		ok    bool
	}{
		{AccessRemoteRead, AccessMWBind, true},
		{AccessRemoteRead | AccessRemoteWrite, AccessMWBind | AccessLocalWrite, true},
		{AccessRemoteWrite, AccessMWBind, false},                   // remote write over a read-only region
		{AccessRemoteRead, AccessLocalWrite, false},                // region without MW_BIND
		{0, AccessMWBind, false},                                   // no right at all
		{AccessLocalWrite, AccessMWBind | AccessLocalWrite, false}, // local rights on a window
		{AccessMWBind | AccessRemoteRead, AccessMWBind, false},
	} {
		if err := r.w.ValidateMW(r.mr); (err == nil) != r.ok || (err != nil && !errors.Is(err, ErrInvalid)) {
			t.Errorf("ValidateMW(%v over %v) = %v", r.w, r.mr, err)
		}
	}
}

func TestCanTransition(t *testing.T) {
	allowed := map[[2]QPState]bool{}
	for s := QPReset; s <= QPError; s++ {
		allowed[[2]QPState{s, QPReset}] = true
		allowed[[2]QPState{s, QPError}] = true
	}
	for _, p := range [][2]QPState{{QPRTS, QPRTS}, {QPSQD, QPRTS}, {QPSQE, QPRTS}, {QPRTS, QPSQD}, {QPSQD, QPSQD}} {
		allowed[p] = true
	}
	for from := QPReset; from <= QPError; from++ {
		for to := QPReset; to <= QPError+1; to++ {
			if got := from.CanTransition(to); got != allowed[[2]QPState{from, to}] {
				t.Errorf("%v -> %v: %v", from, to, got)
			}
		}
	}
}

func TestServiceID(t *testing.T) {
	s := SDPServiceID(0xbeef)
	if uint64(s) != 0x1beef || s.Port() != 0xbeef || !s.IsSDP() || s.IsTCP() {
		t.Errorf("SDP service ID %#x", uint64(s))
	}
	s = TCPServiceID(443)
	if uint64(s) != 0x010601bb || s.Port() != 443 || s.IsSDP() || !s.IsTCP() {
		t.Errorf("TCP service ID %#x", uint64(s))
	}
	if ServiceID(0x20000).IsSDP() || ServiceID(0xffff).IsSDP() {
		t.Error("SDP range is 0x10000-0x1ffff")
	}
}

func TestIncRKey(t *testing.T) {
	for _, r := range [][2]uint32{{0x1200, 0x1201}, {0x12ff, 0x1200}, {0xffffffff, 0xffffff00}} {
		if got := IncRKey(r[0]); got != r[1] {
			t.Errorf("IncRKey(%#x) = %#x, want %#x", r[0], got, r[1])
		}
	}
}

func TestSGELen(t *testing.T) {
	w := SendWR{SGL: []SGE{{Length: 10}, {Length: 1 << 31}, {Length: 5}}}
	if got := w.Len(); got != 10+1<<31+5 {
		t.Errorf("Len = %d", got)
	}
	var many []SGE
	for i := 0; i < 1<<10; i++ {
		many = append(many, SGE{Length: ^uint32(0)})
	}
	r := RecvWR{SGL: many}
	if got := r.Len(); got != uint64(len(many))*uint64(^uint32(0)) {
		t.Errorf("Len of many = %d", got)
	}
	if (&RecvWR{}).Len() != 0 {
		t.Error("empty list has a length")
	}
}

func TestErrors(t *testing.T) {
	if ErrClosed != net.ErrClosed {
		t.Error("ErrClosed is not net.ErrClosed")
	}
	for _, r := range []struct {
		err  error
		want error
	}{
		{(&Completion{ID: 1, Status: StatusRemoteAccess}).Err(), ErrCompletion},
		{&PostError{Index: 2, Err: ErrQueueFull}, ErrQueueFull},
		{&RejectError{Reason: RejectConsumer, PrivateData: []byte("x")}, ErrRefused},
		{&PrivateDataError{Msg: "REQ", Len: 93, Limit: 92}, ErrInvalid},
		{&AddrError{Err: ErrUnreachable}, ErrUnreachable},
		{&BusyError{Object: "pd", Children: "1 MR"}, ErrBusy},
		{fmt.Errorf("wrapped: %w", &RejectError{Reason: RejectInvalidServiceID}), ErrRefused},
	} {
		if !errors.Is(r.err, r.want) {
			t.Errorf("%v is not %v", r.err, r.want)
		}
		if r.err.Error() == "" {
			t.Errorf("%T has no message", r.err)
		}
	}
	if (Completion{Status: StatusSuccess}).Err() != nil {
		t.Error("a successful completion has an error")
	}
	var ce *CompletionError
	if !errors.As((Completion{ID: 7, Status: StatusFlushed}).Err(), &ce) || ce.Completion.ID != 7 {
		t.Error("CompletionError does not carry the completion")
	}
}

func TestPrivateDataLimits(t *testing.T) {
	l := PrivateDataLimits{Req: 56, Rep: 196, Rej: 148}
	for _, r := range []struct {
		msg string
		n   int
		ok  bool
	}{
		{"REQ", 56, true}, {"REQ", 57, false}, {"REP", 196, true}, {"REP", 197, false},
		{"REJ", 148, true}, {"REJ", 149, false}, {"DREQ", 0, false},
	} {
		err := l.Check(r.msg, r.n)
		if (err == nil) != r.ok {
			t.Errorf("Check(%s, %d) = %v", r.msg, r.n, err)
		}
		var pe *PrivateDataError
		if err != nil && r.msg != "DREQ" && (!errors.As(err, &pe) || pe.Limit != r.n-1) {
			t.Errorf("Check(%s, %d): %v", r.msg, r.n, err)
		}
	}
	for _, p := range []ConnParam{{RNRRetry: 8}, {RetryCount: 9}} {
		if err := p.Validate(); !errors.Is(err, ErrInvalid) {
			t.Errorf("Validate(%+v) = %v", p, err)
		}
	}
	if err := (&ConnParam{RNRRetry: 7, RetryCount: 7}).Validate(); err != nil {
		t.Error(err)
	}
}

func fds(t *testing.T) int {
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	return len(ents)
}

func TestAllocDMA(t *testing.T) {
	for _, n := range []int{0, -1, 1<<40 + 1} {
		if _, err := AllocDMA(n); !errors.Is(err, ErrInvalid) {
			t.Errorf("AllocDMA(%d) = %v", n, err)
		}
	}
	d, err := AllocDMA(5000)
	if err != nil {
		t.Fatal(err)
	}
	b := d.Bytes()
	if len(b) != 5000 || cap(b) != 5000 || d.Len() != 5000 {
		t.Fatalf("len %d cap %d", len(b), cap(b))
	}
	for _, x := range b {
		if x != 0 {
			t.Fatal("not zero-filled")
		}
	}
	b[4999] = 1
	if err := errors.Join(d.Close(), d.Close()); err != nil {
		t.Fatal(err)
	}
	if d.Bytes() != nil {
		t.Error("Bytes after Close")
	}
}

func newEventFD(t *testing.T) (*PollFD, int) {
	t.Helper()
	efd, err := unix.Eventfd(0, unix.EFD_CLOEXEC)
	if err != nil {
		t.Fatal(err)
	}
	p, err := NewPollFD(efd, "test")
	if err != nil {
		t.Fatal(err)
	}
	return p, efd
}

func TestPollFD(t *testing.T) {
	f0 := fds(t)
	p, _ := newEventFD(t)
	signal := func() {
		if err := p.Control(func(fd int) {
			if err := WriteEventFD(fd); err != nil {
				t.Error(err)
			}
		}); err != nil {
			t.Error(err)
		}
	}
	// A pending event is consumed at once.
	signal()
	if err := p.Wait(context.Background(), ReadEventFD); err != nil {
		t.Fatal(err)
	}
	// Nothing pending: the context ends the wait.
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Millisecond)
	err := p.Wait(ctx, ReadEventFD)
	cancel()
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("wait without an event: %v", err)
	}
	// A later wait is not poisoned by the earlier deadline.
	go func() {
		time.Sleep(20 * time.Millisecond)
		signal()
	}()
	if err := p.Wait(context.Background(), ReadEventFD); err != nil {
		t.Fatal(err)
	}
	// consume's error is returned.
	boom := errors.New("boom")
	signal()
	if err := p.Wait(context.Background(), func(int) (bool, error) { return false, boom }); !errors.Is(err, boom) {
		t.Fatalf("consume error: %v", err)
	}
	// Close wakes a waiter with ErrClosed.
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			err := p.Wait(context.Background(), ReadEventFD)
			if err != nil {
				if !errors.Is(err, ErrClosed) {
					t.Errorf("wait on a closed PollFD: %v", err)
				}
				return
			}
		}
	}()
	time.Sleep(20 * time.Millisecond)
	if err := errors.Join(p.Close(), p.Close()); err != nil {
		t.Fatal(err)
	}
	wg.Wait()
	if err := p.Control(func(int) {}); !errors.Is(err, ErrClosed) {
		t.Errorf("Control after Close: %v", err)
	}
	if f := fds(t); f != f0 {
		t.Errorf("fds %d -> %d", f0, f)
	}
}

// fakeCQ checks PollWait's poll, arm, poll, wait order.
type fakeCQ struct {
	calls   []string
	pending int
	armed   bool
}

func (f *fakeCQ) Poll(wc []Completion) (int, error) {
	f.calls = append(f.calls, "poll")
	if f.pending == 0 {
		return 0, nil
	}
	f.pending--
	wc[0] = Completion{ID: 1}
	return 1, nil
}
func (f *fakeCQ) Notify(bool) error { f.calls = append(f.calls, "notify"); f.armed = true; return nil }
func (f *fakeCQ) Wait(ctx context.Context) error {
	f.calls = append(f.calls, "wait")
	if !f.armed {
		return errors.New("wait without arming")
	}
	f.pending = 1
	return nil
}
func (f *fakeCQ) Cap() int     { return 1 }
func (f *fakeCQ) Close() error { return nil }

func TestPollWait(t *testing.T) {
	f := &fakeCQ{}
	wc := make([]Completion, 1)
	n, err := PollWait(context.Background(), f, wc)
	if err != nil || n != 1 {
		t.Fatalf("PollWait = %d, %v", n, err)
	}
	if got := strings.Join(f.calls, ","); got != "poll,notify,poll,wait,poll" {
		t.Errorf("calls %s", got)
	}
	if _, err := PollWait(context.Background(), f, nil); !errors.Is(err, ErrInvalid) {
		t.Errorf("empty slice: %v", err)
	}
}

// TestDependencies keeps the package graph honest: nothing here imports "C"
// or the packages above verbs.
func TestDependencies(t *testing.T) {
	goBin, err := exec.LookPath("go")
	if err != nil {
		goBin = filepath.Join(runtime.GOROOT(), "bin", "go")
	}
	out, err := exec.Command(goBin, "list", "-deps", "-f", "{{.ImportPath}} {{len .CgoFiles}}",
		"github.com/vsdp/vsdp/verbs", "github.com/vsdp/vsdp/verbs/soft", "github.com/vsdp/vsdp/verbs/verbstest").CombinedOutput()
	if err != nil {
		t.Fatalf("go list: %v\n%s", err, out)
	}
	const mod = "github.com/vsdp/vsdp/"
	seen := 0
	for _, line := range strings.Split(strings.TrimSpace(string(out)), "\n") {
		path, cgo, _ := strings.Cut(line, " ")
		if !strings.HasPrefix(path, mod) {
			continue
		}
		seen++
		if cgo != "0" {
			t.Errorf("%s has cgo files", path)
		}
		for _, bad := range []string{"verbs/ibv", "sdpback", "vhost", "cmd/", "internal/daemon"} {
			if strings.HasPrefix(strings.TrimPrefix(path, mod), bad) {
				t.Errorf("verbs depends on %s", path)
			}
		}
	}
	if seen < 3 {
		t.Errorf("go list saw %d packages of the module", seen)
	}
}
