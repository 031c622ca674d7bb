"""What is written to disk and read back: checkpoints and model folders (safetensors, atomic), and Hugging Face
import/export."""
