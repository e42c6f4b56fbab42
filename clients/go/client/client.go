// Package client is a small Townhall client in Go: rooms, joining as a listener, a room's audio from
// its relay (resumed after a relay failure), following the protocol in docs/client-protocol.md.
package client

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"strconv"
	"sync"
	"time"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	pb "townhall.dev/townhall/clients/go/townhall/v1"
)

// TicketKey is the metadata key that carries a ticket from Join to the relay.
const TicketKey = "townhall-ticket"

// Metadata keys of the first error convention, read when a server sends no error details.
const (
	retryAfterKey = "retry-after-ms"
	reasonKey     = "townhall-reason"
)

// Client is one user's view of Townhall: every call carries the user's token.
type Client struct {
	token string
	creds credentials.TransportCredentials
	conn  *grpc.ClientConn
	// Rooms, Admission and Moderation on the admission address given to Dial.
	Rooms      pb.RoomsClient
	Admission  pb.AdmissionClient
	Moderation pb.ModerationClient

	mu     sync.Mutex
	relays map[string]*grpc.ClientConn // one connection per relay address, kept
}

// Dial makes a client for the user whose token is given, calling admission at address (host:port).
// creds nil means plaintext (the local topology); pass credentials.NewClientTLSFromFile for TLS.
func Dial(address, token string, creds credentials.TransportCredentials) (*Client, error) {
	if creds == nil {
		creds = insecure.NewCredentials()
	}
	conn, err := grpc.NewClient(address, grpc.WithTransportCredentials(creds))
	if err != nil {
		return nil, err
	}
	return &Client{
		token: token, creds: creds, conn: conn, relays: map[string]*grpc.ClientConn{},
		Rooms: pb.NewRoomsClient(conn), Admission: pb.NewAdmissionClient(conn),
		Moderation: pb.NewModerationClient(conn),
	}, nil
}

// Close closes every connection of the client.
func (c *Client) Close() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	errs := []error{c.conn.Close()}
	for _, conn := range c.relays {
		errs = append(errs, conn.Close())
	}
	return errors.Join(errs...)
}

// Authorized is ctx with the user's token in the `authorization` metadata, for calls made on the stubs.
func (c *Client) Authorized(ctx context.Context) context.Context {
	return metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+c.token)
}

// CreateRoom creates a room hosted by this user (the token needs the `host` grant). The request
// carries an idempotency key, so the retries of a lost answer return the same room.
func (c *Client) CreateRoom(ctx context.Context, title string) (*pb.Room, error) {
	key := make([]byte, 16)
	if _, err := rand.Read(key); err != nil {
		return nil, err
	}
	request := &pb.CreateRoomRequest{Title: title, RequestId: hex.EncodeToString(key)}
	return c.roomCall(ctx, func(ctx context.Context, opts ...grpc.CallOption) (*pb.Room, error) {
		return c.Rooms.CreateRoom(ctx, request, opts...)
	})
}

// StartRoom starts this user's room (idempotent).
func (c *Client) StartRoom(ctx context.Context, roomID string) (*pb.Room, error) {
	request := &pb.StartRoomRequest{RoomId: roomID}
	return c.roomCall(ctx, func(ctx context.Context, opts ...grpc.CallOption) (*pb.Room, error) {
		return c.Rooms.StartRoom(ctx, request, opts...)
	})
}

// GetRoom returns a room.
func (c *Client) GetRoom(ctx context.Context, roomID string) (*pb.Room, error) {
	request := &pb.GetRoomRequest{RoomId: roomID}
	return c.roomCall(ctx, func(ctx context.Context, opts ...grpc.CallOption) (*pb.Room, error) {
		return c.Rooms.GetRoom(ctx, request, opts...)
	})
}

// roomCall makes a Rooms call (all safe to repeat), again after a short retry-after, and while admission
// is UNAVAILABLE or ABORTED, with backoff, until ctx is done.
func (c *Client) roomCall(
	ctx context.Context, call func(context.Context, ...grpc.CallOption) (*pb.Room, error),
) (*pb.Room, error) {
	backoff := 100 * time.Millisecond
	for {
		var trailer metadata.MD
		attempt, cancel := context.WithTimeout(c.Authorized(ctx), 15*time.Second)
		room, err := call(attempt, grpc.Trailer(&trailer))
		cancel()
		if err == nil {
			return room, nil
		}
		wait, ok := RetryAfter(err, trailer)
		switch {
		case status.Code(err) == codes.ResourceExhausted && ok && wait <= 5*time.Second:
		case status.Code(err) == codes.Unavailable, status.Code(err) == codes.Aborted:
			// ABORTED (OWNER_CHANGED): another admission process took the room over mid-change, which
			// was not made: as safe to send again as a call that found no process.
			wait, backoff = backoff, min(time.Second, 2*backoff)
		default:
			return nil, err
		}
		if sleep(ctx, wait) != nil {
			return nil, err
		}
	}
}

// Join admits this user to a live room: a grant (ticket, relay, role). A waiting answer, or a
// RESOURCE_EXHAUSTED refusal, is retried after the delay the server asked for; any other refusal
// is returned (see Reason).
func (c *Client) Join(ctx context.Context, roomID string) (*pb.Grant, error) {
	for {
		var trailer metadata.MD
		attempt, cancel := context.WithTimeout(c.Authorized(ctx), 10*time.Second)
		reply, err := c.Admission.Join(attempt, &pb.JoinRequest{RoomId: roomID}, grpc.Trailer(&trailer))
		cancel()
		var wait time.Duration
		switch {
		case err == nil && reply.GetGrant() != nil:
			return reply.GetGrant(), nil
		case err == nil:
			wait = time.Duration(reply.GetWaiting().GetRetryAfterMs()) * time.Millisecond
		case status.Code(err) == codes.ResourceExhausted:
			if wait, _ = RetryAfter(err, trailer); wait == 0 {
				wait = time.Second
			}
		case status.Code(err) == codes.Unavailable:
			wait = 200 * time.Millisecond
		default:
			return nil, err
		}
		if err := sleep(ctx, wait); err != nil {
			return nil, fmt.Errorf("not admitted to room %s: %w", roomID, err)
		}
	}
}

// relay is a connection to the relay at address, made once.
func (c *Client) relay(address string) (pb.RelayClient, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	conn, ok := c.relays[address]
	if !ok {
		var err error
		if conn, err = grpc.NewClient(address, grpc.WithTransportCredentials(c.creds)); err != nil {
			return nil, err
		}
		c.relays[address] = conn
	}
	return pb.NewRelayClient(conn), nil
}

// Subscribe opens the room's chunk stream on the grant's relay, resuming after (epoch, sequence)
// when sequence > 0.
func (c *Client) Subscribe(
	ctx context.Context, grant *pb.Grant, roomID string, epoch, sequence uint64,
) (grpc.ServerStreamingClient[pb.Chunk], error) {
	relay, err := c.relay(grant.GetRelayAddress())
	if err != nil {
		return nil, err
	}
	ctx = metadata.AppendToOutgoingContext(ctx, TicketKey, grant.GetTicket())
	request := &pb.SubscribeRequest{RoomId: roomID, ResumeAfter: sequence, ResumeEpoch: epoch}
	return relay.Subscribe(ctx, request)
}

// Fatal reports whether a stream that ended with err cannot be fixed by joining again.
func Fatal(err error) bool {
	switch status.Code(err) {
	case codes.PermissionDenied, codes.FailedPrecondition, codes.InvalidArgument, codes.NotFound,
		codes.Unauthenticated:
		return true
	}
	return false
}

// Listen delivers the room's chunks to each, in order and each once, until ctx is done, each returns
// an error or a fatal status ends the stream. When a relay fails or sends the listener away, it joins
// again (admission names a live relay) and resumes after the last chunk delivered, so the relay's
// buffer fills the gap. It gives up after giveUp without a chunk.
func (c *Client) Listen(ctx context.Context, roomID string, giveUp time.Duration, each func(*pb.Chunk) error) error {
	var epoch, sequence uint64
	heard := heardFrames{}
	backoff := 50 * time.Millisecond
	progress := time.Now()
	for {
		joinCtx, cancel := context.WithTimeout(ctx, giveUp)
		grant, err := c.Join(joinCtx, roomID)
		cancel()
		if err != nil {
			return err
		}
		stage := grant.GetRole() != pb.Role_ROLE_LISTENER
		streamCtx, stop := context.WithCancel(ctx)
		var from, after uint64
		if !stage { // the stage gets live frames numbered apart: nothing to resume
			from, after = epoch, sequence
		}
		stream, err := c.Subscribe(streamCtx, grant, roomID, from, after)
		for err == nil {
			var chunk *pb.Chunk
			if chunk, err = stream.Recv(); err != nil {
				break
			}
			progress, backoff = time.Now(), 50*time.Millisecond
			if !stage {
				if chunk.GetEpoch() == epoch && chunk.GetSequence() <= sequence {
					continue // resumed from a relay that had sent it already
				}
				epoch, sequence = chunk.GetEpoch(), chunk.GetSequence()
			}
			if chunk = heard.fresh(chunk); len(chunk.GetFrames()) == 0 {
				continue
			}
			err = each(chunk)
			if err != nil {
				stop()
				return err
			}
		}
		var trailer metadata.MD
		if stream != nil {
			trailer = stream.Trailer()
		}
		stop()
		if ctx.Err() != nil {
			return ctx.Err()
		}
		if Fatal(err) {
			return err
		}
		if time.Since(progress) > giveUp {
			return fmt.Errorf("no relay carried room %s for %s: %w", roomID, giveUp, err)
		}
		// The relay's hint first (a full relay's, a slow listener's 0); sent away on purpose (draining,
		// upstream lost): join again at once; else back off while admission notices the relay is gone.
		wait, hinted := RetryAfter(err, trailer)
		switch {
		case hinted:
		case Reason(err, trailer) != "":
			wait = 0
		default:
			wait, backoff = backoff, min(time.Second, 2*backoff)
		}
		if sleep(ctx, wait) != nil {
			return ctx.Err()
		}
	}
}

// Watch delivers the room's updates (Rooms.WatchRoom: the room as it is, then each change of it and of its
// live counts) to each, until the room ends (nil), ctx is done, each returns an error or the stream ends
// with a status other than UNAVAILABLE. A stream that an admission process ends as it drains, or that
// breaks, is opened again on the address given to Dial (any admission process serves any room): its
// first update is the room as it is then.
func (c *Client) Watch(ctx context.Context, roomID string, each func(*pb.RoomUpdate) error) error {
	backoff := 50 * time.Millisecond
	for {
		streamCtx, stop := context.WithCancel(c.Authorized(ctx))
		stream, err := c.Rooms.WatchRoom(streamCtx, &pb.WatchRoomRequest{RoomId: roomID})
		for err == nil {
			var update *pb.RoomUpdate
			if update, err = stream.Recv(); err != nil {
				break
			}
			backoff = 50 * time.Millisecond
			if err = each(update); err != nil {
				stop()
				return err
			}
		}
		stop()
		switch {
		case errors.Is(err, io.EOF):
			return nil // the stream ends OK after the update that ends the room
		case ctx.Err() != nil:
			return ctx.Err()
		case status.Code(err) != codes.Unavailable:
			return err
		}
		if sleep(ctx, backoff) != nil {
			return ctx.Err()
		}
		backoff = min(time.Second, 2*backoff)
	}
}

// maxSpeakers bounds heardFrames: past it, the speakers heard are forgotten (a stage holds at most 15).
const maxSpeakers = 1024

// heardFrames is the newest frame delivered per speaker (sequence, capture time): a speaker that moved to
// another relay sends its last frames again, and a listener drops those it has.
type heardFrames map[uint64][2]int64

// fresh is chunk without the frames already heard (chunk itself when none was).
func (h heardFrames) fresh(chunk *pb.Chunk) *pb.Chunk {
	kept := chunk.GetFrames()[:0:0]
	for _, frame := range chunk.GetFrames() {
		last, seen := h[frame.GetSpeakerId()]
		if seen && int64(frame.GetSequence()) <= last[0] && frame.GetCaptureTsUs() <= last[1] {
			continue
		}
		if !seen && len(h) >= maxSpeakers {
			clear(h)
		}
		h[frame.GetSpeakerId()] = [2]int64{int64(frame.GetSequence()), frame.GetCaptureTsUs()}
		kept = append(kept, frame)
	}
	if len(kept) == len(chunk.GetFrames()) {
		return chunk
	}
	return &pb.Chunk{Sequence: chunk.GetSequence(), EmittedTsUs: chunk.GetEmittedTsUs(), Epoch: chunk.GetEpoch(), Frames: kept}
}

// RetryAfter is the delay a refusal asked for: its RetryInfo detail, else the `retry-after-ms`
// trailer (the first convention, kept for one deprecation window).
func RetryAfter(err error, trailer metadata.MD) (time.Duration, bool) {
	for _, detail := range status.Convert(err).Details() {
		if info, ok := detail.(*errdetails.RetryInfo); ok && info.GetRetryDelay() != nil {
			return info.GetRetryDelay().AsDuration(), true
		}
	}
	for _, value := range trailer.Get(retryAfterKey) {
		if ms, err := strconv.Atoi(value); err == nil && ms >= 0 {
			return time.Duration(ms) * time.Millisecond, true
		}
	}
	return 0, false
}

// Reason is the stable reason of a refusal or of a stream the server ended (ROOM_FULL, DRAINING, ...):
// its ErrorInfo detail, else the `townhall-reason` trailer ("draining", "upstream-lost"); "" if none.
func Reason(err error, trailer metadata.MD) string {
	for _, detail := range status.Convert(err).Details() {
		if info, ok := detail.(*errdetails.ErrorInfo); ok {
			return info.GetReason()
		}
	}
	if values := trailer.Get(reasonKey); len(values) > 0 {
		return values[0]
	}
	return ""
}

func sleep(ctx context.Context, d time.Duration) error {
	timer := time.NewTimer(d)
	defer timer.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-timer.C:
		return nil
	}
}
