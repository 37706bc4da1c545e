package verbs

import (
	"context"
	"errors"
)

// DialConfig configures Dial.
type DialConfig struct {
	Resolve ResolveOptions
	PD      PD
	QP      QPOptions
	Param   ConnParam
	// Prepare runs once the queue pair exists and before the REQ goes out:
	// post the initial receives here, so the peer may send at once.
	Prepare func(QP) error
}

// Dial resolves, creates the queue pair, runs Prepare and connects. It
// returns the connection and the REP's private data; on failure everything
// it created is closed again.
func Dial(ctx context.Context, dev Device, cfg DialConfig) (Conn, []byte, error) {
	c, err := dev.Resolve(ctx, cfg.Resolve)
	if err != nil {
		return nil, nil, err
	}
	qp, err := c.CreateQP(cfg.PD, cfg.QP)
	if err != nil {
		return nil, nil, errors.Join(err, c.Close())
	}
	if cfg.Prepare != nil {
		if err := cfg.Prepare(qp); err != nil {
			return nil, nil, errors.Join(err, qp.Close(), c.Close())
		}
	}
	rep, err := c.Connect(ctx, cfg.Param)
	if err != nil {
		return nil, nil, errors.Join(err, qp.Close(), c.Close())
	}
	return c, rep, nil
}

// AcceptConfig configures AcceptConn.
type AcceptConfig struct {
	PD      PD
	QP      QPOptions
	Param   ConnParam
	Prepare func(QP) error // post the initial receives here
}

// AcceptConn creates the queue pair of a connection request, runs Prepare and
// accepts. On failure it closes the queue pair; the caller still owns c.
func AcceptConn(ctx context.Context, c Conn, cfg AcceptConfig) error {
	qp, err := c.CreateQP(cfg.PD, cfg.QP)
	if err != nil {
		return err
	}
	if cfg.Prepare != nil {
		if err := cfg.Prepare(qp); err != nil {
			return errors.Join(err, qp.Close())
		}
	}
	if err := c.Accept(ctx, cfg.Param); err != nil {
		return errors.Join(err, qp.Close())
	}
	return nil
}

// PollWait returns at least one completion, waiting on the CQ's notification
// when it is empty: poll, arm, poll again (closing the race with a completion
// that arrived before the arming), wait.
func PollWait(ctx context.Context, cq CQ, wc []Completion) (int, error) {
	if len(wc) == 0 {
		return 0, ErrInvalid
	}
	for {
		n, err := cq.Poll(wc)
		if n > 0 || err != nil {
			return n, err
		}
		if err := cq.Notify(false); err != nil {
			return 0, err
		}
		n, err = cq.Poll(wc)
		if n > 0 || err != nil {
			return n, err
		}
		if err := cq.Wait(ctx); err != nil {
			return 0, err
		}
	}
}
