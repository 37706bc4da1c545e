package agent

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"syscall"
	"time"

	"github.com/vsdp/vsdp/vmtest/internal/proto"
)

// DefaultMaxRunning bounds concurrent requests when Server.MaxRunning is 0.
const DefaultMaxRunning = 64

// waitDelay bounds how long a program's pipes may stay open after it exits
// (held by a process it left behind).
const waitDelay = 2 * time.Second

// Server serves the agent protocol.
type Server struct {
	Hello      proto.Hello  // sent first
	MaxRunning int          // 0 means DefaultMaxRunning
	Env        []string     // base environment of programs; nil means os.Environ()
	Poweroff   func() error // called after a poweroff request is answered; nil refuses them

	mu      sync.Mutex
	running map[uint32]*run // Exec requests in flight, by id

	wmu sync.Mutex
	w   io.Writer
}

// run is an Exec in flight; cancel is nil until its process starts.
type run struct {
	cancel   context.CancelFunc
	canceled bool
}

// Serve writes Hello and then answers requests read from rw until rw fails
// or ctx ends. Before it returns it kills running programs and waits for
// their handlers. When ctx ends first, the caller must close rw to end the
// goroutine that reads it.
func (s *Server) Serve(ctx context.Context, rw io.ReadWriter) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	s.w = rw
	s.mu.Lock()
	s.running = make(map[uint32]*run)
	s.mu.Unlock()
	max := s.MaxRunning
	if max <= 0 {
		max = DefaultMaxRunning
	}
	sem := make(chan struct{}, max)

	hello, _ := json.Marshal(s.Hello)
	if err := s.write(proto.Frame{Type: proto.TypeHello, Payload: hello}); err != nil {
		return err
	}

	var wg sync.WaitGroup
	defer wg.Wait()
	defer cancel() // runs before wg.Wait: kills the programs

	frames := make(chan proto.Frame)
	readErr := make(chan error, 1)
	go func() {
		br := bufio.NewReaderSize(rw, 64<<10)
		for {
			// Noise on the line is skipped up to the next frame.
			f, err := proto.ReadFrameSync(br, 1<<30)
			if err != nil {
				readErr <- err
				return
			}
			select {
			case frames <- f:
			case <-ctx.Done():
				readErr <- ctx.Err()
				return
			}
		}
	}()

	for {
		var f proto.Frame
		select {
		case <-ctx.Done():
			return ctx.Err()
		case err := <-readErr:
			return err
		case f = <-frames:
		}
		switch f.Type {
		case proto.TypeCancel:
			s.mu.Lock()
			if r := s.running[f.ID]; r != nil {
				r.canceled = true
				if r.cancel != nil {
					r.cancel()
				}
			}
			s.mu.Unlock()
			continue
		case proto.TypeExec, proto.TypeWriteFile, proto.TypeReadFile, proto.TypePoweroff:
		default:
			s.reply(f.ID, proto.Reply{Error: fmt.Sprintf("unexpected %v frame", f.Type)})
			continue
		}
		select {
		case sem <- struct{}{}:
		default:
			s.reply(f.ID, proto.Reply{Error: fmt.Sprintf("busy: %d requests running", max)})
			continue
		}
		if f.Type == proto.TypeExec {
			// Registered before the next frame is read, so a Cancel that
			// follows finds it.
			s.mu.Lock()
			s.running[f.ID] = &run{}
			s.mu.Unlock()
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			s.handle(ctx, f)
		}()
	}
}

func (s *Server) write(f proto.Frame) error {
	s.wmu.Lock()
	defer s.wmu.Unlock()
	return proto.WriteFrame(s.w, f)
}

func (s *Server) reply(id uint32, r proto.Reply) {
	b, err := json.Marshal(r)
	if err == nil && len(b) > proto.MaxPayload {
		b, err = json.Marshal(proto.Reply{Error: fmt.Sprintf("reply of %d bytes exceeds the frame limit", len(b))})
	}
	if err != nil {
		b, _ = json.Marshal(proto.Reply{Error: err.Error()})
	}
	// A write error means the channel is gone; the read side reports it.
	_ = s.write(proto.Frame{Type: proto.TypeReply, ID: id, Payload: b})
}

func (s *Server) handle(ctx context.Context, f proto.Frame) {
	switch f.Type {
	case proto.TypeExec:
		var req proto.Exec
		r := decode(f.Payload, &req, req.Validate)
		if r.Error == "" {
			r = s.exec(ctx, f.ID, &req)
		}
		s.mu.Lock()
		delete(s.running, f.ID)
		s.mu.Unlock()
		s.reply(f.ID, r)
	case proto.TypeWriteFile:
		var req proto.WriteFile
		r := decode(f.Payload, &req, req.Validate)
		if r.Error == "" {
			r = writeFile(&req)
		}
		s.reply(f.ID, r)
	case proto.TypeReadFile:
		var req proto.ReadFile
		r := decode(f.Payload, &req, req.Validate)
		if r.Error == "" {
			r = readFile(&req)
		}
		s.reply(f.ID, r)
	case proto.TypePoweroff:
		if s.Poweroff == nil {
			s.reply(f.ID, proto.Reply{Error: "poweroff not supported here"})
			return
		}
		s.reply(f.ID, proto.Reply{})
		if err := s.Poweroff(); err != nil {
			// Too late for the reply; the host sees the guest stay up.
			return
		}
	}
}

// decode unmarshals a request and validates it; a failure becomes an
// error reply.
func decode(payload []byte, v any, validate func() error) proto.Reply {
	if err := json.Unmarshal(payload, v); err != nil {
		return proto.Reply{Error: "bad request: " + err.Error()}
	}
	if err := validate(); err != nil {
		return proto.Reply{Error: "bad request: " + err.Error()}
	}
	return proto.Reply{}
}

func (s *Server) exec(ctx context.Context, id uint32, req *proto.Exec) proto.Reply {
	ctx, cancel := context.WithTimeout(ctx, time.Duration(req.TimeoutMS)*time.Millisecond)
	defer cancel()
	s.mu.Lock()
	r := s.running[id]
	if r == nil {
		r = &run{}
		s.running[id] = r
	}
	canceled := r.canceled
	r.cancel = cancel
	s.mu.Unlock()
	if canceled {
		cancel()
	}

	cmd := exec.CommandContext(ctx, req.Argv[0], req.Argv[1:]...)
	env := s.Env
	if env == nil {
		env = os.Environ()
	}
	cmd.Env = append(append([]string(nil), env...), req.Env...)
	cmd.Dir = req.Dir
	cmd.Stdin = bytes.NewReader(req.Stdin)
	stdout := &capped{max: req.MaxOutput}
	stderr := &capped{max: req.MaxOutput}
	cmd.Stdout, cmd.Stderr = stdout, stderr
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	cmd.Cancel = func() error { return syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL) }
	cmd.WaitDelay = waitDelay
	start := time.Now()
	err := cmd.Run()
	if cmd.ProcessState == nil {
		if ctx.Err() != nil {
			// Canceled or timed out before it started.
			s.mu.Lock()
			canceled := r.canceled
			s.mu.Unlock()
			return proto.Reply{Exec: &proto.ExecResult{Exit: -1, Canceled: canceled, TimedOut: !canceled}}
		}
		return proto.Reply{Error: fmt.Sprintf("start %q: %v", req.Argv[0], err)}
	}
	// Leave nothing of the group behind (a daemon the program started
	// belongs to its own Exec).
	syscall.Kill(-cmd.ProcessState.Pid(), syscall.SIGKILL)
	res := &proto.ExecResult{
		Stdout:     stdout.buf.Bytes(),
		Stderr:     stderr.buf.Bytes(),
		Exit:       cmd.ProcessState.ExitCode(),
		Truncated:  stdout.truncated || stderr.truncated,
		DurationNS: int64(time.Since(start)),
	}
	if ws, ok := cmd.ProcessState.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
		res.Signal = ws.Signal().String()
	}
	s.mu.Lock()
	res.Canceled = r.canceled
	s.mu.Unlock()
	res.TimedOut = !res.Canceled && errors.Is(ctx.Err(), context.DeadlineExceeded)
	return proto.Reply{Exec: res}
}

// capped keeps the first max bytes written to it and swallows the rest, so
// a chatty program never blocks or fails on its output.
type capped struct {
	buf       bytes.Buffer
	max       int
	truncated bool
}

func (c *capped) Write(p []byte) (int, error) {
	room := c.max - c.buf.Len()
	if len(p) > room {
		c.truncated = true
		c.buf.Write(p[:max(room, 0)])
		return len(p), nil
	}
	c.buf.Write(p)
	return len(p), nil
}

func writeFile(req *proto.WriteFile) proto.Reply {
	mode := os.FileMode(req.Mode)
	if mode == 0 {
		mode = 0o644
	}
	if err := os.MkdirAll(filepath.Dir(req.Path), 0o755); err != nil {
		return proto.Reply{Error: err.Error()}
	}
	flags := os.O_WRONLY | os.O_CREATE | os.O_TRUNC
	if req.Append {
		flags = os.O_WRONLY | os.O_CREATE | os.O_APPEND
	}
	f, err := os.OpenFile(req.Path, flags, mode)
	if err != nil {
		return proto.Reply{Error: err.Error()}
	}
	_, werr := f.Write(req.Data)
	if err := errors.Join(werr, f.Close()); err != nil {
		return proto.Reply{Error: err.Error()}
	}
	return proto.Reply{}
}

func readFile(req *proto.ReadFile) proto.Reply {
	f, err := os.Open(req.Path)
	if err != nil {
		return proto.Reply{Error: err.Error()}
	}
	defer f.Close()
	data, err := io.ReadAll(io.LimitReader(f, req.Max+1))
	if err != nil {
		return proto.Reply{Error: err.Error()}
	}
	if int64(len(data)) > req.Max {
		return proto.Reply{Error: fmt.Sprintf("%s is larger than %d bytes", req.Path, req.Max)}
	}
	return proto.Reply{Data: data}
}
