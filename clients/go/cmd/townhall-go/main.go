// Command townhall-go creates a room (or takes one), joins it as a listener, prints what it hears and,
// with -watch-events, what happens in the room.
//
// Each line of its output is a JSON object: {"event":"room",...} once the room is live,
// {"event":"grant",...} when admitted, then one {"event":"chunk",...} per chunk of audio, with every
// frame's payload in base64, and one {"event":"watch",...} per WatchRoom update (live counts, what
// changed). It exits 0 after -chunks chunks and -watch-events room events, 1 on an error (on stderr).
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"os"
	"sync"
	"time"

	"google.golang.org/grpc/credentials"

	"townhall.dev/townhall/clients/go/client"
	pb "townhall.dev/townhall/clients/go/townhall/v1"
)

type frame struct {
	SpeakerID uint64 `json:"speaker_id"`
	Sequence  uint32 `json:"sequence"`
	Payload   []byte `json:"payload"`
}

type roomEvent struct {
	Kind   string `json:"kind"`
	UserID uint64 `json:"user_id,omitempty"`
	Role   string `json:"role,omitempty"`
	State  string `json:"state,omitempty"`
}

type event struct {
	Event    string  `json:"event"`
	RoomID   string  `json:"room_id,omitempty"`
	State    string  `json:"state,omitempty"`
	Relay    string  `json:"relay,omitempty"`
	Role     string  `json:"role,omitempty"`
	Epoch    uint64  `json:"epoch,omitempty"`
	Sequence uint64  `json:"sequence,omitempty"`
	Frames   []frame `json:"frames,omitempty"`
	// WatchRoom updates: the room's version (when the update carries the room), counts and events.
	Version   uint64      `json:"version,omitempty"`
	Listeners *uint64     `json:"listeners,omitempty"`
	Speakers  *uint32     `json:"speakers,omitempty"`
	Events    []roomEvent `json:"events,omitempty"`
	Resync    bool        `json:"resync,omitempty"`
}

// output writes events as JSON lines, from several goroutines.
type output struct {
	mu  sync.Mutex
	enc *json.Encoder
}

func (o *output) emit(e event) error {
	o.mu.Lock()
	defer o.mu.Unlock()
	return o.enc.Encode(e)
}

func watchLine(update *pb.RoomUpdate) event {
	counts := update.GetCounts()
	listeners, speakers := counts.GetListeners(), counts.GetSpeakers()
	line := event{Event: "watch", Listeners: &listeners, Speakers: &speakers, Resync: update.GetResync()}
	if room := update.GetRoom(); room != nil {
		line.RoomID, line.Version, line.State = room.GetRoomId(), room.GetVersion(), room.GetState().String()
	}
	for _, e := range update.GetEvents() {
		seen := roomEvent{Kind: e.GetKind().String(), UserID: e.GetUserId()}
		if e.GetKind() == pb.RoomEvent_KIND_ROLE {
			seen.Role = e.GetRole().String()
		}
		if e.GetKind() == pb.RoomEvent_KIND_STATE {
			seen.State = e.GetState().String()
		}
		line.Events = append(line.Events, seen)
	}
	return line
}

func main() {
	admission := flag.String("admission", "127.0.0.1:50051", "admission host:port")
	hostToken := flag.String("host-token", os.Getenv("TOWNHALL_HOST_TOKEN"),
		"a token with the host grant, to create and start the room ($TOWNHALL_HOST_TOKEN)")
	token := flag.String("token", os.Getenv("TOWNHALL_TOKEN"),
		"the listener's token, with the subscribe grant ($TOWNHALL_TOKEN)")
	room := flag.String("room", "", "a live room to join (else one is created with -host-token)")
	title := flag.String("title", "A room from Go", "the title of the room created")
	chunks := flag.Int("chunks", 10, "exit after this many chunks")
	watchEvents := flag.Int("watch-events", 0, "also watch the room (WatchRoom); exit after this many room events too")
	timeout := flag.Duration("timeout", time.Minute, "give up after this long")
	ca := flag.String("ca", "", "PEM file of the CA to trust: TLS (default: plaintext)")
	flag.Parse()
	err := run(*admission, *hostToken, *token, *room, *title, *chunks, *watchEvents, *timeout, *ca)
	if err != nil {
		fmt.Fprintln(os.Stderr, "townhall-go:", err)
		os.Exit(1)
	}
}

func run(
	admission, hostToken, token, roomID, title string, chunks, watchEvents int, timeout time.Duration, ca string,
) error {
	if token == "" || (roomID == "" && hostToken == "") {
		return errors.New("need -token, and -host-token unless -room is given")
	}
	var creds credentials.TransportCredentials
	if ca != "" {
		var err error
		if creds, err = credentials.NewClientTLSFromFile(ca, ""); err != nil {
			return err
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	out := &output{enc: json.NewEncoder(os.Stdout)}
	if roomID == "" {
		host, err := client.Dial(admission, hostToken, creds)
		if err != nil {
			return err
		}
		defer host.Close()
		room, err := host.CreateRoom(ctx, title)
		if err != nil {
			return fmt.Errorf("CreateRoom: %w", err)
		}
		if room, err = host.StartRoom(ctx, room.GetRoomId()); err != nil {
			return fmt.Errorf("StartRoom: %w", err)
		}
		roomID = room.GetRoomId()
		if err := out.emit(event{Event: "room", RoomID: roomID, State: room.GetState().String()}); err != nil {
			return err
		}
	}
	listener, err := client.Dial(admission, token, creds)
	if err != nil {
		return err
	}
	defer listener.Close()
	done := errors.New("done")
	watched := make(chan error, 1)
	if watchEvents > 0 {
		go func() {
			seen := 0
			watched <- listener.Watch(ctx, roomID, func(update *pb.RoomUpdate) error {
				if err := out.emit(watchLine(update)); err != nil {
					return err
				}
				if seen += len(update.GetEvents()); seen >= watchEvents {
					return done
				}
				return nil
			})
		}()
	}
	// Join once to show the grant; Listen joins again whenever it has to move to another relay.
	grant, err := listener.Join(ctx, roomID)
	if err != nil {
		return fmt.Errorf("Join: %w", err)
	}
	err = out.emit(event{Event: "grant", Relay: grant.GetRelayAddress(), Role: grant.GetRole().String()})
	if err != nil {
		return err
	}
	received := 0
	err = listener.Listen(ctx, roomID, 30*time.Second, func(chunk *pb.Chunk) error {
		line := event{Event: "chunk", Epoch: chunk.GetEpoch(), Sequence: chunk.GetSequence()}
		for _, f := range chunk.GetFrames() {
			line.Frames = append(line.Frames, frame{f.GetSpeakerId(), f.GetSequence(), f.GetPayload()})
		}
		if err := out.emit(line); err != nil {
			return err
		}
		if received++; received >= chunks {
			return done
		}
		return nil
	})
	if !errors.Is(err, done) {
		return fmt.Errorf("Listen: %w", err)
	}
	if watchEvents > 0 {
		switch err := <-watched; {
		case err == nil:
			return fmt.Errorf("WatchRoom: the room ended before %d events", watchEvents)
		case !errors.Is(err, done):
			return fmt.Errorf("WatchRoom: %w", err)
		}
	}
	return nil
}
