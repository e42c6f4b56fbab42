// Command townhall-go creates a room (or takes one), joins it as a listener and prints what it hears.
//
// Each line of its output is a JSON object: {"event":"room",...} once the room is live,
// {"event":"grant",...} when admitted, then one {"event":"chunk",...} per chunk of audio, with every
// frame's payload in base64. It exits 0 after -chunks chunks, 1 on an error (printed to stderr).
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"os"
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

type event struct {
	Event    string  `json:"event"`
	RoomID   string  `json:"room_id,omitempty"`
	State    string  `json:"state,omitempty"`
	Relay    string  `json:"relay,omitempty"`
	Role     string  `json:"role,omitempty"`
	Epoch    uint64  `json:"epoch,omitempty"`
	Sequence uint64  `json:"sequence,omitempty"`
	Frames   []frame `json:"frames,omitempty"`
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
	timeout := flag.Duration("timeout", time.Minute, "give up after this long")
	ca := flag.String("ca", "", "PEM file of the CA to trust: TLS (default: plaintext)")
	flag.Parse()
	if err := run(*admission, *hostToken, *token, *room, *title, *chunks, *timeout, *ca); err != nil {
		fmt.Fprintln(os.Stderr, "townhall-go:", err)
		os.Exit(1)
	}
}

func run(admission, hostToken, token, roomID, title string, chunks int, timeout time.Duration, ca string) error {
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
	out := json.NewEncoder(os.Stdout)
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
		if err := out.Encode(event{Event: "room", RoomID: roomID, State: room.GetState().String()}); err != nil {
			return err
		}
	}
	listener, err := client.Dial(admission, token, creds)
	if err != nil {
		return err
	}
	defer listener.Close()
	// Join once to show the grant; Listen joins again whenever it has to move to another relay.
	grant, err := listener.Join(ctx, roomID)
	if err != nil {
		return fmt.Errorf("Join: %w", err)
	}
	err = out.Encode(event{Event: "grant", Relay: grant.GetRelayAddress(), Role: grant.GetRole().String()})
	if err != nil {
		return err
	}
	received := 0
	done := errors.New("done")
	err = listener.Listen(ctx, roomID, 30*time.Second, func(chunk *pb.Chunk) error {
		line := event{Event: "chunk", Epoch: chunk.GetEpoch(), Sequence: chunk.GetSequence()}
		for _, f := range chunk.GetFrames() {
			line.Frames = append(line.Frames, frame{f.GetSpeakerId(), f.GetSequence(), f.GetPayload()})
		}
		if err := out.Encode(line); err != nil {
			return err
		}
		if received++; received >= chunks {
			return done
		}
		return nil
	})
	if errors.Is(err, done) {
		return nil
	}
	return fmt.Errorf("Listen: %w", err)
}
