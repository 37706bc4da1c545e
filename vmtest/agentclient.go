package vmtest

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"strings"
	"sync"
	"time"

	"github.com/vsdp/vsdp/vmtest/internal/proto"
)

// Defaults for agent requests.
const (
	// DefaultCommandTimeout applies to a Cmd with no Timeout.
	DefaultCommandTimeout = time.Minute
	// DefaultMaxOutput bounds the stdout and the stderr kept of a Cmd.
	DefaultMaxOutput = 4 << 20
	// replySlack is how much longer than a command's own timeout the host
	// waits for its reply (transfer over the serial line, scheduling).
	replySlack = 30 * time.Second
	// fileTimeout bounds a file request with no deadline in its context.
	fileTimeout = 2 * time.Minute
)

// Cmd is a program to run in the guest.
type Cmd struct {
	Args    []string      // program and arguments; the guest's PATH is searched
	Env     []string      // KEY=VALUE added to the agent's environment
	Dir     string        // working directory; "" is /
	Stdin   []byte        // standard input
	Timeout time.Duration // the guest kills the process group after this; 0 is DefaultCommandTimeout
	// MaxOutput bounds the bytes kept of stdout and of stderr each
	// (Result.Truncated reports a cut); 0 is DefaultMaxOutput.
	MaxOutput int
}

// Result is how a guest program ended.
type Result struct {
	Args      []string
	Stdout    []byte
	Stderr    []byte
	ExitCode  int    // -1 when killed by a signal
	Signal    string // the signal that killed it, if any
	TimedOut  bool   // killed because Cmd.Timeout passed
	Canceled  bool   // killed because the host canceled it
	Truncated bool   // output beyond Cmd.MaxOutput was dropped
	Duration  time.Duration
}

// Err returns nil when the program exited with status 0, and an *ExitError
// otherwise.
func (r *Result) Err() error {
	if r.ExitCode == 0 && r.Signal == "" && !r.TimedOut && !r.Canceled {
		return nil
	}
	return &ExitError{Result: r}
}

// ExitError is a guest program that did not exit with status 0.
type ExitError struct{ Result *Result }

func (e *ExitError) Error() string {
	r := e.Result
	how := fmt.Sprintf("exit status %d", r.ExitCode)
	switch {
	case r.TimedOut:
		how = "timed out"
	case r.Canceled:
		how = "canceled"
	case r.Signal != "":
		how = "killed by " + r.Signal
	}
	msg := fmt.Sprintf("vmtest: guest %q: %s", strings.Join(r.Args, " "), how)
	if s := strings.TrimSpace(lastBytes(r.Stderr, 2048)); s != "" {
		msg += ": " + s
	}
	return msg
}

// AgentError is a request the guest agent refused or failed (a bad
// request, a program not found, a file error).
type AgentError struct {
	Op  string // "exec", "read-file", ...
	Arg string // program or path
	Msg string // the agent's message
}

func (e *AgentError) Error() string {
	return fmt.Sprintf("vmtest: guest agent %s %s: %s", e.Op, e.Arg, e.Msg)
}

// Agent is the host end of the connection to a guest's agent. Its methods
// may be called concurrently; requests run concurrently in the guest.
type Agent struct {
	conn io.ReadWriteCloser

	wmu sync.Mutex // serialises frame writes

	mu      sync.Mutex
	pending map[uint32]chan proto.Frame
	next    uint32
	err     error         // set once the connection is gone
	hello   proto.Hello   // latest greeting
	helloCh chan struct{} // closed and replaced when a new greeting arrives
	done    chan struct{}
}

// newAgent reads from conn until the agent's Hello (skipping noise) or
// deadline, then starts the reader. conn is closed on failure.
func newAgent(conn net.Conn, deadline time.Time) (*Agent, error) {
	br := bufio.NewReaderSize(conn, 64<<10)
	conn.SetReadDeadline(deadline)
	var hello proto.Hello
	for {
		f, err := proto.ReadFrameSync(br, 1<<20)
		if err != nil {
			conn.Close()
			return nil, fmt.Errorf("%w: waiting for the agent: %v", ErrAgent, err)
		}
		if f.Type != proto.TypeHello {
			continue
		}
		if err := json.Unmarshal(f.Payload, &hello); err != nil || hello.Version != proto.Version {
			conn.Close()
			return nil, fmt.Errorf("%w: bad hello %q (version %d wanted): %v", ErrAgent, f.Payload, proto.Version, err)
		}
		break
	}
	conn.SetReadDeadline(time.Time{})
	a := &Agent{
		conn:    conn,
		pending: make(map[uint32]chan proto.Frame),
		hello:   hello,
		helloCh: make(chan struct{}),
		done:    make(chan struct{}),
	}
	go a.read(br)
	return a, nil
}

// Hello returns the agent's latest greeting (guest kernel, agent pid).
func (a *Agent) Hello() proto.Hello {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.hello
}

// waitRestart waits for a greeting from an agent that started after the
// one whose Start is given (the guest was reset or the agent restarted).
func (a *Agent) waitRestart(ctx context.Context, start int64) (proto.Hello, error) {
	for {
		a.mu.Lock()
		h, ch, err := a.hello, a.helloCh, a.err
		a.mu.Unlock()
		if h.Start != start {
			return h, nil
		}
		if err != nil {
			return h, err
		}
		select {
		case <-ch:
		case <-a.done:
		case <-ctx.Done():
			return h, fmt.Errorf("%w: waiting for the agent to restart: %v", ErrAgent, ctx.Err())
		}
	}
}

func (a *Agent) read(r io.Reader) {
	defer close(a.done)
	for {
		f, err := proto.ReadFrame(r)
		if err != nil {
			a.fail(fmt.Errorf("%w: %v", ErrAgent, err))
			return
		}
		switch f.Type {
		case proto.TypeReply:
			a.mu.Lock()
			ch := a.pending[f.ID]
			delete(a.pending, f.ID)
			a.mu.Unlock()
			if ch != nil {
				ch <- f // buffered, one reply per request
			}
		case proto.TypeHello:
			// The agent restarted: what it was running is gone.
			var h proto.Hello
			json.Unmarshal(f.Payload, &h)
			a.mu.Lock()
			a.hello = h
			close(a.helloCh)
			a.helloCh = make(chan struct{})
			pending := a.pending
			a.pending = make(map[uint32]chan proto.Frame)
			a.mu.Unlock()
			for _, ch := range pending {
				close(ch)
			}
		}
	}
}

// fail records the first connection error and fails every pending request.
func (a *Agent) fail(err error) {
	a.mu.Lock()
	if a.err == nil {
		a.err = err
	}
	pending := a.pending
	a.pending = make(map[uint32]chan proto.Frame)
	a.mu.Unlock()
	for _, ch := range pending {
		close(ch)
	}
}

// Close closes the connection; pending requests fail. It is idempotent.
func (a *Agent) Close() error {
	a.fail(fmt.Errorf("%w: closed", ErrAgent))
	err := a.conn.Close()
	<-a.done
	if errors.Is(err, net.ErrClosed) {
		err = nil
	}
	return err
}

// request is a request in flight.
type request struct {
	a  *Agent
	t  proto.Type
	id uint32
	ch chan proto.Frame
}

// send sends a request; its reply is awaited with wait.
func (a *Agent) send(ctx context.Context, t proto.Type, req any) (*request, error) {
	payload, err := json.Marshal(req)
	if err != nil {
		return nil, err
	}
	ch := make(chan proto.Frame, 1)
	a.mu.Lock()
	if a.err != nil {
		a.mu.Unlock()
		return nil, a.err
	}
	a.next++
	id := a.next
	a.pending[id] = ch
	a.mu.Unlock()
	if err := a.write(ctx, proto.Frame{Type: t, ID: id, Payload: payload}); err != nil {
		a.forget(id)
		return nil, err
	}
	return &request{a: a, t: t, id: id, ch: ch}, nil
}

// wait waits for the reply. If ctx ends first, an Exec is canceled in the
// guest and the reply is abandoned.
func (r *request) wait(ctx context.Context) (*proto.Reply, error) {
	select {
	case f, ok := <-r.ch:
		if !ok {
			r.a.mu.Lock()
			err := r.a.err
			r.a.mu.Unlock()
			if err == nil {
				err = fmt.Errorf("%w: the agent restarted during the request", ErrAgent)
			}
			return nil, err
		}
		var rep proto.Reply
		if err := json.Unmarshal(f.Payload, &rep); err != nil {
			return nil, fmt.Errorf("%w: bad reply: %v", ErrAgent, err)
		}
		return &rep, nil
	case <-ctx.Done():
		r.a.forget(r.id)
		r.cancel()
		return nil, fmt.Errorf("vmtest: waiting for the guest agent: %w", ctx.Err())
	}
}

// cancel asks the agent to kill an Exec's process group; its reply (with
// Canceled set) still comes. Best effort.
func (r *request) cancel() {
	if r.t != proto.TypeExec {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	r.a.write(ctx, proto.Frame{Type: proto.TypeCancel, ID: r.id})
}

// call sends a request and waits for its reply.
func (a *Agent) call(ctx context.Context, t proto.Type, req any) (*proto.Reply, error) {
	r, err := a.send(ctx, t, req)
	if err != nil {
		return nil, err
	}
	return r.wait(ctx)
}

func (a *Agent) forget(id uint32) {
	a.mu.Lock()
	delete(a.pending, id)
	a.mu.Unlock()
}

func (a *Agent) write(ctx context.Context, f proto.Frame) error {
	a.wmu.Lock()
	defer a.wmu.Unlock()
	if c, ok := a.conn.(net.Conn); ok {
		d, ok := ctx.Deadline()
		if !ok {
			d = time.Now().Add(fileTimeout)
		}
		c.SetWriteDeadline(d)
	}
	if err := proto.WriteFrame(a.conn, f); err != nil {
		return fmt.Errorf("%w: %v", ErrAgent, err)
	}
	return nil
}

// Process is a guest program started with Start.
type Process struct {
	args   []string
	req    *request
	cancel context.CancelFunc // of the bounding context
	ctx    context.Context
}

// Start starts a program in the guest and returns without waiting for it
// (a server, say). Wait or Stop must be called.
func (a *Agent) Start(ctx context.Context, c Cmd) (*Process, error) {
	timeout := c.Timeout
	if timeout <= 0 {
		timeout = DefaultCommandTimeout
	}
	maxOut := c.MaxOutput
	if maxOut <= 0 {
		maxOut = DefaultMaxOutput
	}
	req := proto.Exec{
		Argv:      c.Args,
		Env:       c.Env,
		Dir:       c.Dir,
		Stdin:     c.Stdin,
		TimeoutMS: max(timeout.Milliseconds(), 1),
		MaxOutput: maxOut,
	}
	if err := req.Validate(); err != nil {
		return nil, &AgentError{Op: "exec", Arg: strings.Join(c.Args, " "), Msg: err.Error()}
	}
	// The reply is awaited at most this long after the program's own
	// timeout, whatever the caller's context says later.
	wctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), timeout+replySlack)
	r, err := a.send(ctx, proto.TypeExec, &req)
	if err != nil {
		cancel()
		return nil, err
	}
	return &Process{args: c.Args, req: r, cancel: cancel, ctx: wctx}, nil
}

// Wait waits for the program to end. If ctx ends first the program is
// killed and Wait returns ctx's error.
func (p *Process) Wait(ctx context.Context) (*Result, error) {
	defer p.cancel()
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	stop := context.AfterFunc(p.ctx, cancel)
	defer stop()
	rep, err := p.req.wait(ctx)
	if err != nil {
		return nil, err
	}
	if rep.Error != "" || rep.Exec == nil {
		return nil, &AgentError{Op: "exec", Arg: strings.Join(p.args, " "), Msg: rep.Error}
	}
	e := rep.Exec
	return &Result{
		Args:      p.args,
		Stdout:    e.Stdout,
		Stderr:    e.Stderr,
		ExitCode:  e.Exit,
		Signal:    e.Signal,
		TimedOut:  e.TimedOut,
		Canceled:  e.Canceled,
		Truncated: e.Truncated,
		Duration:  time.Duration(e.DurationNS),
	}, nil
}

// Stop kills the program's process group and returns its result (Canceled
// set, unless it had ended already), waiting at most until ctx ends.
func (p *Process) Stop(ctx context.Context) (*Result, error) {
	p.req.cancel()
	return p.Wait(ctx)
}

// Exec runs a program in the guest and returns how it ended; a program that
// ran and failed is a Result, not an error (see Result.Err). The wait is
// bounded by ctx and by the command's timeout plus a margin.
func (a *Agent) Exec(ctx context.Context, c Cmd) (*Result, error) {
	p, err := a.Start(ctx, c)
	if err != nil {
		return nil, err
	}
	return p.Wait(ctx)
}

// Run runs a program with default limits and returns its result; a
// non-zero exit is an *ExitError (with the result inside).
func (a *Agent) Run(ctx context.Context, args ...string) (*Result, error) {
	r, err := a.Exec(ctx, Cmd{Args: args})
	if err != nil {
		return nil, err
	}
	return r, r.Err()
}

// WriteFile writes a file in the guest (parents created); mode 0 is 0644.
func (a *Agent) WriteFile(ctx context.Context, path string, data []byte, mode os.FileMode) error {
	ctx, cancel := withDefaultTimeout(ctx, fileTimeout)
	defer cancel()
	req := proto.WriteFile{Path: path, Data: data, Mode: uint32(mode.Perm())}
	if err := req.Validate(); err != nil {
		return &AgentError{Op: "write-file", Arg: path, Msg: err.Error()}
	}
	r, err := a.call(ctx, proto.TypeWriteFile, &req)
	if err != nil {
		return err
	}
	if r.Error != "" {
		return &AgentError{Op: "write-file", Arg: path, Msg: r.Error}
	}
	return nil
}

// ReadFile reads a guest file of at most proto.MaxFile bytes.
func (a *Agent) ReadFile(ctx context.Context, path string) ([]byte, error) {
	ctx, cancel := withDefaultTimeout(ctx, fileTimeout)
	defer cancel()
	req := proto.ReadFile{Path: path, Max: proto.MaxFile}
	if err := req.Validate(); err != nil {
		return nil, &AgentError{Op: "read-file", Arg: path, Msg: err.Error()}
	}
	r, err := a.call(ctx, proto.TypeReadFile, &req)
	if err != nil {
		return nil, err
	}
	if r.Error != "" {
		return nil, &AgentError{Op: "read-file", Arg: path, Msg: r.Error}
	}
	return r.Data, nil
}

// Poweroff asks the guest to power off; QEMU then exits.
func (a *Agent) Poweroff(ctx context.Context) error {
	ctx, cancel := withDefaultTimeout(ctx, 30*time.Second)
	defer cancel()
	r, err := a.call(ctx, proto.TypePoweroff, struct{}{})
	if err != nil {
		return err
	}
	if r.Error != "" {
		return &AgentError{Op: "poweroff", Msg: r.Error}
	}
	return nil
}

// withDefaultTimeout bounds ctx by d unless it already has a deadline.
func withDefaultTimeout(ctx context.Context, d time.Duration) (context.Context, context.CancelFunc) {
	if _, ok := ctx.Deadline(); ok {
		return context.WithCancel(ctx)
	}
	return context.WithTimeout(ctx, d)
}

func lastBytes(b []byte, n int) string {
	if len(b) > n {
		b = b[len(b)-n:]
	}
	return string(b)
}
