package keeper

import (
	"context"
	"fmt"

	"github.com/containerd/ttrpc"
	"google.golang.org/protobuf/types/known/emptypb"

	"github.com/kuasar-io/containerd-kuasar/plugins/internal/launch"
	"github.com/kuasar-io/containerd-kuasar/plugins/internal/unixsock"
	"github.com/kuasar-io/containerd-kuasar/plugins/keeper/api"
)

// Client is the daemon's connection to the keeper.
type Client struct {
	c    *ttrpc.Client
	api  api.KeeperService
	done chan struct{}

	// KeeperPid is the pid of the keeper process answering; Boot changes
	// with every keeper process.
	KeeperPid int
	Boot      string
}

// Dial connects to a running keeper.
func Dial(ctx context.Context, socket string) (*Client, error) {
	done := make(chan struct{})
	tc, err := unixsock.Dial(ctx, socket, func() { close(done) })
	if err != nil {
		return nil, err
	}
	c := &Client{c: tc, api: api.NewKeeperClient(tc), done: done}
	h, err := c.api.Hello(ctx, &api.HelloRequest{Version: ProtocolVersion})
	if err = unixsock.Native(err); err != nil {
		tc.Close()
		return nil, fmt.Errorf("keeper hello: %w", err)
	}
	if h.GetVersion() != ProtocolVersion {
		tc.Close()
		return nil, fmt.Errorf("keeper at %s speaks protocol %d, want %d", socket, h.GetVersion(), ProtocolVersion)
	}
	c.KeeperPid, c.Boot = int(h.GetPid()), h.GetBoot()
	return c, nil
}

// Launch describes how to start a keeper when none answers.
type Launch struct {
	Binary  string   // path of the kuasar-keeper executable
	Socket  string   // socket path it listens on
	LogPath string   // file its output goes to
	Args    []string // extra arguments
}

// Connect dials the keeper at l.Socket, starting one from l.Binary when
// none answers. A started keeper is detached (own session) so it outlives
// the caller.
func Connect(ctx context.Context, l Launch) (*Client, error) {
	if c, err := Dial(ctx, l.Socket); err == nil {
		return c, nil
	}
	var c *Client
	err := launch.Detached(ctx, launch.Spec{
		Binary:  l.Binary,
		Args:    append([]string{"--socket", l.Socket}, l.Args...),
		LogPath: l.LogPath,
	}, func(ctx context.Context) error {
		var err error
		c, err = Dial(ctx, l.Socket)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("starting the keeper: %w", err)
	}
	return c, nil
}

// Done is closed when the keeper connection is gone.
func (c *Client) Done() <-chan struct{} { return c.done }

// Close ends the connection; the keeper and its children keep running.
func (c *Client) Close() error { return c.c.Close() }

// SpawnResult is what a spawn started.
type SpawnResult struct {
	// Process is the command started.
	Process ProcessRef
	// Exit is the command's, when it was spawned with Wait.
	Exit *Exit
	// Child is the process named by the pid file, when one was given.
	Child ProcessRef
}

// Spawn starts a process as a child of the keeper (see api.SpawnRequest).
// With req.Wait the command is killed if ctx's deadline passes first.
func (c *Client) Spawn(ctx context.Context, req *api.SpawnRequest) (SpawnResult, error) {
	r, err := c.api.Spawn(ctx, req)
	if err = unixsock.Native(err); err != nil {
		return SpawnResult{}, err
	}
	res := SpawnResult{Process: refFromAPI(r.GetProcess()), Child: refFromAPI(r.GetChild())}
	if r.GetExit() != nil {
		e := exitFromAPI(r.GetExit())
		res.Exit = &e
	}
	return res, nil
}

// Wait returns the exit of ref, blocking until it exits; with noBlock it
// returns nil at once for a process still running. A process the keeper
// does not know (not running, no exit kept) is errdefs.ErrNotFound.
func (c *Client) Wait(ctx context.Context, ref ProcessRef, noBlock bool) (*Exit, error) {
	r, err := c.api.Wait(ctx, &api.WaitRequest{Process: ref.toAPI(), NoBlock: noBlock})
	if err = unixsock.Native(err); err != nil {
		return nil, err
	}
	if r.GetExit() == nil {
		return nil, nil
	}
	e := exitFromAPI(r.GetExit())
	return &e, nil
}

// Ack releases the exit of ref (or, for a live process, says nobody will
// wait for it).
func (c *Client) Ack(ctx context.Context, ref ProcessRef) error {
	_, err := c.api.Ack(ctx, ref.toAPI())
	return unixsock.Native(err)
}

// ResizePty resizes the terminal held under key.
func (c *Client) ResizePty(ctx context.Context, key string, w, h uint32) error {
	_, err := c.api.ResizePty(ctx, &api.ResizePtyRequest{Key: key, Width: w, Height: h})
	return unixsock.Native(err)
}

// CloseStdin closes the keeper's end of the stdin held under key.
func (c *Client) CloseStdin(ctx context.Context, key string) error {
	_, err := c.api.CloseStdin(ctx, &api.IORef{Key: key})
	return unixsock.Native(err)
}

// ReleaseIO drops the streams held under key (or every key starting with
// it, with prefix).
func (c *Client) ReleaseIO(ctx context.Context, key string, prefix bool) error {
	_, err := c.api.ReleaseIO(ctx, &api.IORef{Key: key, Prefix: prefix})
	return unixsock.Native(err)
}

// ListIO lists the keys of the streams the keeper holds.
func (c *Client) ListIO(ctx context.Context) ([]string, error) {
	r, err := c.api.ListIO(ctx, &emptypb.Empty{})
	if err = unixsock.Native(err); err != nil {
		return nil, err
	}
	return r.GetKeys(), nil
}
